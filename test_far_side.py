"""The far side: minimail's own SMTP client, as the queue runner and the
sendmail command use it, against hosters that lie, drip, never end a reply
or take their time, and the addresses it passes on.

The hoster here is a tiny SMTP server of this module's own (FarSide), honest
unless it is told a lie, behind a stand-in tunnel that forwards to it (or,
while the test says the hoster is away, exits at once as an ssh that cannot
connect would, so the mail goes to the queue).  The first tests are pure
units of the client, on a socket pair, in milliseconds.
"""

import collections
import io
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import threading
import time

import pytest

import minimail
from conftest import console_script, make_message, minimail_command, proc_status, wait_until

CONSOLE_SCRIPT = console_script()


# ---------------------------------------------------------------------------
# The client's units: replies, bounds, deadlines, stuffing
# ---------------------------------------------------------------------------

@pytest.fixture
def far_end():
    """(a client on one end of a socket pair, the other end), closed after the test."""
    ours, theirs = socket.socketpair()
    deadlines = {**dict.fromkeys(minimail.REPLY_DEADLINES, 5.0), "MAIL": 1.0}
    client = minimail.SmtpClient(ours, deadlines=deadlines)
    yield client, theirs
    ours.close()
    theirs.close()


def reference_stuffing(text):
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in text.splitlines(keepends=True))
    return stuffed + (b".\r\n" if text.endswith(b"\r\n") or not text else b"\r\n.\r\n")


@pytest.mark.parametrize("seed", range(40))
def test_dot_stuffing_is_the_same_in_any_blocks(seed):
    rng = random.Random(seed)
    text = b"".join(rng.choice([b".", b"..", b"a", b"\r\n", b"\r\n.", b".\r\n", b"x.y", b"\n"])
                    for _ in range(rng.randrange(0, 60)))
    text = text.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")       # CRLF line ends
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
    stuffer = minimail.DotStuffer()
    blocks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    assert b"".join(stuffer.stuff(block) for block in blocks) + stuffer.end() == \
        reference_stuffing(text)


def test_a_multiline_reply_is_read_whole_and_the_extensions_kept(far_end):
    client, theirs = far_end
    theirs.sendall(b"220 far.example ESMTP\r\n")

    def answer_ehlo():
        assert theirs.recv(100) == b"EHLO desktop.example\r\n"
        theirs.sendall(b"250-far.example\r\n250-SIZE 1000\r\n250-smtputf8\r\n250 8BITMIME\n")
    answering = threading.Thread(target=answer_ehlo, daemon=True)
    answering.start()
    client.greet("desktop.example")
    answering.join(5)
    assert client.extensions == {"SIZE": "1000", "SMTPUTF8": "", "8BITMIME": ""}


@pytest.mark.parametrize("reply, complaint", [
    (b"250 " + b"x" * 506 + b"\r\n", None),                               # 512 bytes: fine
    (b"250 " + b"x" * 507 + b"\r\n", "a line of its reply to MAIL is longer than 512 bytes"),
    (b"250 " + b"x" * 100_000, "a line of its reply to MAIL is longer than 512 bytes"),
    (b"250-x\r\n" * 100 + b"250 x\r\n", "its reply to MAIL goes on past 100 lines"),
    (b"250-x\r\n" * 99 + b"250 x\r\n", None),                             # 100 lines: fine
    (b"250-x\r\n550 y\r\n", "its reply to MAIL is not SMTP (a protocol error)"),
    (b"hello\r\n", "its reply to MAIL is not SMTP (a protocol error)"),
    (b"250 ok\r\n250 again\r\n", "sent more than one reply to MAIL (a protocol error)"),
    (b"354 go on\r\n", "answered MAIL with 354, which does not fit (a protocol error)"),
    (b"250 ok", "no whole reply to MAIL within 1 s"),                     # no line end
    (b"", "closed the connection before its reply to MAIL"),
])
def test_replies_are_bounded_and_must_fit_their_step(far_end, reply, complaint):
    client, theirs = far_end
    theirs.sendall(reply)
    if reply == b"":
        theirs.shutdown(socket.SHUT_WR)

    def answer():
        return minimail.goes_on("MAIL", client.reply("MAIL").code)
    if complaint is None:
        assert answer() is True
        return
    with pytest.raises(minimail.DialogueFailed) as failed:
        answer()
    assert str(failed.value) == complaint


def test_a_reply_waiting_before_its_command_is_a_protocol_error(far_end):
    client, theirs = far_end
    theirs.sendall(b"250 2.0.0 stray\r\n")
    time.sleep(0.05)
    with pytest.raises(minimail.DialogueFailed,
                       match=r"^spoke before MAIL was sent \(a protocol error\)$"):
        client.ask("MAIL", "MAIL FROM:<a@b>")
    assert not select_readable(theirs)               # and MAIL was never sent


def select_readable(sock):
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return b""
    finally:
        sock.settimeout(None)


def test_a_deadline_is_for_the_whole_reply_not_each_byte(far_end):
    client, theirs = far_end

    def drip():
        for byte in b"250 2.1.0 ok, slowly\r\n":
            try:
                theirs.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)                          # whole: 6.6 s, never within 1 s
    dripping = threading.Thread(target=drip, daemon=True)
    dripping.start()
    started = time.monotonic()
    with pytest.raises(minimail.DialogueFailed, match=r"^no whole reply to MAIL within 1 s$"):
        client.reply("MAIL")
    assert 0.9 < time.monotonic() - started < 3
    client.sock.shutdown(socket.SHUT_RDWR)           # the dripping ends
    dripping.join(10)


@pytest.mark.parametrize("step, code, goes_on", [
    ("greeting", 220, True), ("greeting", 554, False), ("greeting", 250, None),
    ("EHLO", 250, True), ("EHLO", 502, False), ("EHLO", 354, None),
    ("MAIL", 250, True), ("MAIL", 252, True), ("MAIL", 451, False), ("MAIL", 354, None),
    ("MAIL", 150, None), ("RCPT", 251, True), ("RCPT", 452, False), ("RCPT", 553, False),
    ("DATA", 354, True), ("DATA", 250, None), ("DATA", 554, False), ("DATA", 399, None),
    ("the final dot", 250, True), ("the final dot", 451, False), ("the final dot", 354, None),
])
def test_each_step_takes_only_the_replies_that_fit_it(step, code, goes_on):
    if goes_on is None:
        with pytest.raises(minimail.DialogueFailed, match="does not fit"):
            minimail.goes_on(step, code)
    else:
        assert minimail.goes_on(step, code) is goes_on


def test_a_transaction_the_far_side_cuts_with_452_leaves_the_rest_for_another(far_end):
    client, theirs = far_end
    answers = [b"250 ok", b"250 ok", b"250 ok", b"452 4.5.3 too many", b"354 go"]
    seen = []

    def far_side():
        reader = theirs.makefile("rb")
        for answer in answers:
            seen.append(reader.readline())
            theirs.sendall(answer + b"\r\n")
        while (line := reader.readline()) not in (b".\r\n", b""):
            seen.append(line)
        theirs.sendall(b"250 stored\r\n")
    serving = threading.Thread(target=far_side, daemon=True)
    serving.start()
    done = client.transaction("me@x", ["a@x", "b(c)@x", "d@x", "e@x"], [],
                              io.BytesIO(b"Subject: s\r\n\r\n.dot\r\n"))
    serving.join(5)
    assert [str(done.results[r]) for r in ("a@x", "b(c)@x", "d@x", "e@x")] == \
        ["250 stored", "250 stored", "452 4.5.3 too many", "452 4.5.3 too many"]
    assert done.rest == ["d@x", "e@x"] and done.refused is None
    assert seen == [b"MAIL FROM:<me@x>\r\n", b"RCPT TO:<a@x>\r\n", b"RCPT TO:<b(c)@x>\r\n",
                    b"RCPT TO:<d@x>\r\n", b"DATA\r\n", b"Subject: s\r\n", b"\r\n", b"..dot\r\n"]


def test_a_no_to_mail_stands_when_the_far_side_then_hangs_up(far_end):
    client, theirs = far_end

    def far_side():
        theirs.recv(100)
        theirs.sendall(b"550 5.7.1 not from you\r\n")
        theirs.shutdown(socket.SHUT_RDWR)
    serving = threading.Thread(target=far_side, daemon=True)
    serving.start()
    done = client.transaction("me@x", ["a@x", "b@x"], [], io.BytesIO(b"x\r\n"))
    serving.join(5)
    assert {r: str(reply) for r, reply in done.results.items()} == \
        {"a@x": "550 5.7.1 not from you", "b@x": "550 5.7.1 not from you"}
    assert done.refused.code == 550
    with pytest.raises(minimail.DialogueFailed):               # the next transaction cannot be
        client.transaction("me@x", ["c@x"], [], io.BytesIO(b"x\r\n"))


@pytest.mark.parametrize("word, addresses", [
    ("alice@x,bob@y", ["alice@x", "bob@y"]), ('"a,b"@x', ['"a,b"@x']),
    ("a@x, b@y ,", ["a@x", "b@y"]), ("carol(comment, more)@x", ["carol(comment, more)@x"]),
    ("Ann <a@x>, b@y", ["Ann <a@x>", "b@y"]), ("root", ["root"]),
])
def test_the_sendmail_command_splits_comma_lists_as_sendmail_does(word, addresses):
    assert minimail.split_addresses(word) == addresses
    assert minimail.parse_sendmail_flags(["-i", word])[1] == addresses


# ---------------------------------------------------------------------------
# A far side of the test's own, behind a stand-in tunnel
# ---------------------------------------------------------------------------

Taken = collections.namedtuple("Taken", "mail rcpts text")


class FarSide:
    """A tiny SMTP server standing in for the hoster, one thread per
    connection: honest, unless `lies` says what to answer instead at a step
    ("greeting", "EHLO", "MAIL", "DATA", "dot"), what to send right after the
    greeting ("stray"), how long to take over the answer to the final dot
    ("dot delay"), or gives a function that takes over after EHLO ("EHLO
    forever").  `refuse` answers chosen RCPT lines.  It keeps every command
    line and every message it took (before it answers the dot)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lies, self.refuse = {}, {}
        self.lines, self.taken, self.connections = [], [], 0
        self.accepting = threading.Thread(target=self.accept, daemon=True)
        self.accepting.start()

    def accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.serve, args=(conn, dict(self.lies)), daemon=True).start()

    def serve(self, conn, lies):
        conn.settimeout(120)
        with conn, conn.makefile("rb") as reader:
            try:
                self.dialogue(conn, reader, lies)
            except OSError:
                pass                                 # minimail ended the connection

    def dialogue(self, conn, reader, lies):
        def say(text):
            conn.sendall(text.encode() + b"\r\n")
        say(lies.get("greeting", "220 far.example ESMTP"))
        if "stray" in lies:
            say(lies["stray"])
        mail, rcpts = None, []
        while (line := reader.readline(2000)) and line.endswith(b"\r\n"):
            line = line[:-2]
            self.lines.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO" and "EHLO forever" in lies:
                return lies["EHLO forever"](conn)
            if verb == b"EHLO":
                say(lies.get("EHLO", "250-far.example\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                                     "250 SIZE 100000000"))
            elif verb == b"MAIL":
                mail, rcpts = line, []
                say(lies.get("MAIL", "250 2.1.0 ok"))
            elif verb == b"RCPT":
                rcpts.append(line)
                say(self.refuse.get(line, "250 2.1.5 ok"))
            elif verb == b"DATA":
                say(lies.get("DATA", "354 go ahead"))
                if lies.get("DATA", "354").startswith("354"):
                    self.take(reader, mail, rcpts, lies)
                    say(lies.get("dot", "250 2.0.0 stored"))
            elif verb == b"QUIT":
                return say("221 2.0.0 bye")
            else:
                say("250 2.0.0 ok")

    def take(self, reader, mail, rcpts, lies):
        lines = []
        while (line := reader.readline(2000)) != b".\r\n":
            if not line:
                raise ConnectionResetError("the client left in DATA")
            lines.append(line[1:] if line.startswith(b".") else line)
        time.sleep(lies.get("dot delay", 0))
        self.taken.append(Taken(mail, list(rcpts), b"".join(lines)))

    def stop(self):
        self.listener.shutdown(socket.SHUT_RDWR)     # wakes accept(): then join, then close
        self.accepting.join(10)
        self.listener.close()


@pytest.fixture
def far_side():
    server = FarSide()
    yield server
    server.stop()


@pytest.fixture
def behind_tunnel(far_side, tunnel_double, tmp_path):
    """Start minimail whose stand-in tunnel forwards to the far side while the
    hoster is there (reachable(True)); while it is away the tunnel exits at
    once and mail goes to the queue.  Retries wait 10 min: only a flush
    (SIGUSR1) or a tunnel that comes up makes the runner try."""
    where = tmp_path / "hoster-port"

    def reachable(up):
        if up:
            where.write_text(str(far_side.port))
        elif where.exists():
            where.unlink()

    def start(*options, up=False, linger=30):
        reachable(up)
        mm, _ = tunnel_double("forward", "{port}", where, linger=linger,
                              options=["--queue-retry", 600, *options])
        return mm
    start.reachable = reachable
    return start


def queue_of(mm):
    return json.loads(minimail_command("queue", "--json", "--queue", mm.queue).stdout)["messages"]


def queue_by_hand(port, sender, recipients, text, utf8=False):
    """A client's whole session, command by command (smtplib would rewrite
    the addresses): the reply to the final dot."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock, \
            sock.makefile("rb") as reader:
        def reply():
            while (line := reader.readline())[3:4] == b"-":
                pass
            return line
        assert reply().startswith(b"220")
        for command in ("EHLO desktop.example", f"MAIL FROM:<{sender}>{' SMTPUTF8' * utf8}",
                        *(f"RCPT TO:<{r}>" for r in recipients), "DATA"):
            sock.sendall(command.encode() + b"\r\n")
            assert reply()[:1] in (b"2", b"3"), command
        sock.sendall(re.sub(rb"(?m)^\.", b"..", text) + b".\r\n")
        answer = reply()
        sock.sendall(b"QUIT\r\n")
        return answer


def flush_and_wait(mm, pattern, timeout=30):
    """`minimail flush` (SIGUSR1), then wait for pattern in the log after it."""
    before = len(mm.log())
    mm.proc.send_signal(signal.SIGUSR1)
    return wait_until(lambda: re.search(pattern, mm.log()[before:]), timeout, repr(pattern))


def without_received(text):
    return re.sub(rb"\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", b"", text)


# ---------------------------------------------------------------------------
# Addresses pass as they were given (item 4) and what cannot, is refused
# ---------------------------------------------------------------------------

ODD_BUT_VALID = ["carol(comment)@hoster.example", "alice@hoster.example,bob@hoster.example",
                 '"a b"@hoster.example']


def test_addresses_reach_the_hoster_from_the_queue_exactly_as_through_the_tunnel(
        behind_tunnel, far_side):
    mm = behind_tunnel()                                     # the hoster is away
    text = make_message("verbatim")
    assert queue_by_hand(mm.port, "me(x)@desktop.example", ODD_BUT_VALID, text) \
        .startswith(b"250 2.0.0 queued as")
    behind_tunnel.reachable(True)
    flush_and_wait(mm, r"3 delivered, 0 deferred, 0 refused \(250\)")
    from_queue = list(far_side.lines)
    queue_by_hand(mm.port, "me(x)@desktop.example", ODD_BUT_VALID, text)   # live, through the tunnel
    live = far_side.lines[len(from_queue):]

    def paths(lines):
        return [re.sub(rb"> .*", b">", line) for line in lines
                if line[:4].upper() in (b"MAIL", b"RCPT")]
    assert paths(from_queue) == paths(live) == [
        b"MAIL FROM:<me(x)@desktop.example>", *(f"RCPT TO:<{r}>".encode() for r in ODD_BUT_VALID)]
    queued, direct = far_side.taken
    assert without_received(queued.text) == direct.text == text
    assert "carol" not in mm.log() and "alice" not in mm.log()


@pytest.mark.parametrize("mail, rcpt, reply", [
    ("MAIL FROM:<jörg@desktop.example>", None,
     "553 5.6.7 a non-ASCII sender address needs SMTPUTF8 (MAIL FROM:<...> SMTPUTF8)"),
    ("MAIL FROM:<me@desktop.example>", "RCPT TO:<jörg@hoster.example>",
     "553 5.6.7 a non-ASCII recipient address needs SMTPUTF8 (MAIL FROM:<...> SMTPUTF8)"),
    ("MAIL FROM:<me@desktop.example> SMTPUTF8", "RCPT TO:<jörg@hoster.example>", "250 2.1.5 ok"),
    ("MAIL FROM:<me@desktop.example> SMTPUTF8", b"RCPT TO:<j\xf6rg@hoster.example>",
     "553 5.1.3 the recipient address is not valid UTF-8"),
    ("MAIL FROM:<me@desktop.example>", "RCPT TO:<a\tb@hoster.example>",
     "553 5.1.3 the recipient address holds a control character, < or >"),
    ("MAIL FROM:<me@desktop.example>", f"RCPT TO:<{'x' * 250}@h.example>",
     "553 5.1.3 the recipient address is too long (at most 256 bytes)"),
    ("MAIL FROM:<me@desktop.example>", f"RCPT TO:<{'ü' * 130}@h.example>",
     "553 5.6.7 a non-ASCII recipient address needs SMTPUTF8 (MAIL FROM:<...> SMTPUTF8)"),
    ("MAIL FROM:<me@desktop.example> SMTPUTF8", f"RCPT TO:<{'ü' * 130}@h.example>",
     "553 5.1.3 the recipient address is too long (at most 256 bytes)"),
])
def test_the_queue_refuses_at_mail_or_rcpt_what_it_could_not_pass_on_verbatim(
        behind_tunnel, mail, rcpt, reply):
    mm = behind_tunnel()
    with socket.create_connection(("127.0.0.1", mm.port), timeout=30) as sock, \
            sock.makefile("rb") as reader:
        def command(line):
            sock.sendall((line if isinstance(line, bytes) else line.encode()) + b"\r\n")
            while (answer := reader.readline())[3:4] == b"-":
                pass
            return answer.decode().rstrip("\r\n")
        assert reader.readline().startswith(b"220")
        command("EHLO desktop.example")
        answer = command(mail)
        if rcpt is not None:
            assert answer == "250 2.1.0 ok"
            answer = command(rcpt)
        assert answer == reply



def plant(queue, sender, recipients, text, smtputf8=False):
    """A message put into queued/ by hand, as a queue from elsewhere (or an
    older minimail) could hold it: its queue ID."""
    for where in ("tmp", "queued", "failed"):
        (queue / where).mkdir(mode=0o700, parents=True, exist_ok=True)
    queue.chmod(0o700)
    queue_id = f"{time.time_ns() // 1000 & 0xFFFFFFFFFFFFF:013X}{random.randrange(4096):03X}"
    envelope = {"id": queue_id, "sender": sender, "recipients": recipients, "arrived": time.time(),
                "size": len(text), "body": None, "smtputf8": smtputf8, "bounce": False,
                "attempts": 0, "next_try": time.time(), "last_reply": None, "failures": [],
                "failed_at": None}
    path = queue / "queued" / f"{queue_id}.msg"
    path.write_bytes(b"MINIMAIL-ENVELOPE " + json.dumps(envelope).encode() + b"\r\n" + text)
    path.chmod(0o600)
    time.sleep(0.001)                                # the next ID differs
    return queue_id


def test_a_non_ascii_recipient_without_smtputf8_on_disk_bounces_alone_and_the_daemon_goes_on(
        behind_tunnel, far_side, tmp_path):
    queue = tmp_path / "planted"
    odd = plant(queue, "me@hoster.example", ["jörg@hoster.example", "ok@hoster.example"],
                make_message("planted"))
    plain = plant(queue, "me@hoster.example", ["admin@hoster.example"], make_message("plain"))
    mm = behind_tunnel("--queue", queue, up=True)            # delivers at start
    wait_until(lambda: len(far_side.taken) == 3, 20, "both messages and the bounce")
    mm.wait_for_log(rf"queue: {odd}: 1 delivered, 0 deferred, 1 refused \(250, 553\)")
    mm.wait_for_log(rf"queue: {plain}: 1 delivered, 0 deferred, 0 refused \(250\)")
    bounce, = [t for t in far_side.taken if t.mail.startswith(b"MAIL FROM:<>")]
    assert bounce.rcpts == [b"RCPT TO:<me@hoster.example>"]
    assert b"Final-Recipient: rfc822; j\xc3\xb6rg@hoster.example" in bounce.text
    assert b"Status: 5.6.7" in bounce.text and b"not sent with SMTPUTF8" in bounce.text
    assert not any(b"j\xc3\xb6rg" in line for line in far_side.lines)   # never sent
    assert mm.proc.poll() is None and "Traceback" not in mm.log()


# ---------------------------------------------------------------------------
# A far side that lies, drips, never ends a reply, or takes its time
# ---------------------------------------------------------------------------

def queued_id(answer):
    match = re.fullmatch(rb"250 2\.0\.0 queued as ([0-9A-F]{16})\r\n", answer)
    assert match, answer
    return match[1].decode()


def test_a_252_to_mail_goes_on_to_rcpt_and_data(behind_tunnel, far_side):
    mm = behind_tunnel()
    text = make_message("after-252")
    queue_id = queued_id(queue_by_hand(mm.port, "me@desktop.example", ["admin@hoster.example"],
                                       text))
    far_side.lies = {"MAIL": "252 2.1.0 not sure, but go on"}
    behind_tunnel.reachable(True)
    flush_and_wait(mm, rf"queue: {queue_id}: 1 delivered, 0 deferred, 0 refused \(250\)")
    taken, = far_side.taken                                  # RCPT and DATA were sent
    assert taken.rcpts == [b"RCPT TO:<admin@hoster.example>"]
    assert without_received(taken.text) == text


@pytest.mark.parametrize("lie, complaint", [
    ({"DATA": "250 2.0.0 ok"}, r"answered DATA with 250, which does not fit"),
    ({"MAIL": "354 go ahead"}, r"answered MAIL with 354, which does not fit"),
    ({"stray": "250 2.0.0 early"}, r"more than one reply|spoke before|which does not fit"),
    ({"greeting": "250 far.example"}, r"answered greeting with 250, which does not fit"),
])
def test_a_reply_that_does_not_fit_its_step_defers_and_the_mail_arrives_later_once(
        behind_tunnel, far_side, lie, complaint):
    mm = behind_tunnel()
    text = make_message("lied-to")
    queue_id = queued_id(queue_by_hand(mm.port, "me@desktop.example", ["admin@hoster.example"],
                                       text))
    far_side.lies = lie
    behind_tunnel.reachable(True)
    flush_and_wait(mm, rf"queue: {queue_id}: next try in")
    assert far_side.taken == [] and f"{queue_id}: 1 delivered" not in mm.log()
    assert re.search(rf"queue: the dialogue with the hoster ended: .*({complaint})", mm.log())
    message, = queue_of(mm)
    assert message["attempts"] == 1 and "the connection to the hoster failed" in message["last_reply"]
    far_side.lies = {}                                       # an honest hoster now
    flush_and_wait(mm, rf"queue: {queue_id}: 1 delivered, 0 deferred, 0 refused \(250\)")
    time.sleep(0.5)
    assert [without_received(t.text) for t in far_side.taken] == [text]   # intact, once
    assert queue_of(mm) == []


def endless_ehlo(conn):
    """EHLO answered with 250- lines, never a last one (at most 100 MB or 20 s)."""
    block = (b"250-" + b"x" * 60 + b"\r\n") * 1000
    sent, ends = 0, time.monotonic() + 20
    while sent < 100_000_000 and time.monotonic() < ends:
        conn.sendall(block)
        sent += len(block)


def test_an_endless_reply_is_cut_at_100_lines_and_the_daemon_stays_small(behind_tunnel,
                                                                        far_side):
    mm = behind_tunnel()
    text = make_message("endless")
    queue_id = queued_id(queue_by_hand(mm.port, "me@desktop.example", ["admin@hoster.example"],
                                       text))
    far_side.lies = {"EHLO forever": endless_ehlo}
    behind_tunnel.reachable(True)
    flush_and_wait(mm, rf"queue: {queue_id}: next try in")
    peak = int(proc_status(mm.proc.pid)["VmHWM"].split()[0])        # kB
    print(f"the daemon's peak RSS under an endless reply: {peak / 1024:.1f} MiB")
    assert peak < 100 * 1024
    assert re.search(r"the dialogue with the hoster ended: its reply to EHLO goes on past 100 "
                     r"lines", mm.log())
    far_side.lies = {}                                       # and it keeps serving
    flush_and_wait(mm, rf"queue: {queue_id}: 1 delivered, 0 deferred, 0 refused \(250\)")
    with smtplib.SMTP("127.0.0.1", mm.port, timeout=30) as smtp:     # a live client too
        smtp.sendmail("me@desktop.example", ["admin@hoster.example"], make_message("live"))
    assert [without_received(t.text) for t in far_side.taken] == [text, make_message("live")]


# Slow: about 70 s, as the hoster takes 65 s over its answer to the final dot.
@pytest.mark.timeout(200)
def test_slow_a_hoster_that_answers_the_final_dot_after_65_s_gets_the_mail_once(
        behind_tunnel, far_side):
    mm = behind_tunnel()
    text = make_message("slow-hoster")
    queue_id = queued_id(queue_by_hand(mm.port, "me@desktop.example", ["admin@hoster.example"],
                                       text))
    far_side.lies = {"dot delay": 65}
    behind_tunnel.reachable(True)
    started = time.monotonic()
    flush_and_wait(mm, rf"queue: {queue_id}: 1 delivered, 0 deferred, 0 refused \(250\)",
                   timeout=120)
    print(f"delivered {time.monotonic() - started:.1f} s after the flush")
    time.sleep(1)
    assert [without_received(t.text) for t in far_side.taken] == [text]
    assert far_side.connections == 1 and queue_of(mm) == []
    assert f"{queue_id}: deferred" not in mm.log() and f"{queue_id}: next try" not in mm.log()


# ---------------------------------------------------------------------------
# The sendmail command: every recipient accepted, or a non-zero exit (item 7)
# ---------------------------------------------------------------------------

@pytest.fixture
def sendmail(tmp_path):
    """sendmail(mm, *flags, message=...): the `sendmail` symlink to the console
    script, with a settings file that points at minimail `mm`."""
    link = tmp_path / "bin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(CONSOLE_SCRIPT)
    config = tmp_path / "minimail.conf"

    def run(mm, *flags, message=b"Subject: hello\n\nbody\n"):
        config.write_text(f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{mm.port} --queue {mm.queue}\n"
                          f"MINIMAIL_SENDER=me@desktop.example\n"
                          f"MINIMAIL_ADMIN=admin@hoster.example\n")
        return subprocess.run([str(link), *flags], input=message, capture_output=True,
                              env={**os.environ, "MINIMAIL_CONFIG": str(config)}, timeout=110)
    return run


def test_ten_thousand_recipients_go_in_transactions_of_a_hundred_and_all_wait_in_the_queue(
        behind_tunnel, sendmail):
    mm = behind_tunnel()                                     # the hoster is away
    recipients = [f"r{i}@hoster.example" for i in range(10_000)]
    started = time.monotonic()
    result = sendmail(mm, "-i", *recipients)
    print(f"10,000 recipients submitted in {time.monotonic() - started:.1f} s")
    assert (result.returncode, result.stderr) == (0, b"")
    messages = queue_of(mm)
    assert len(messages) == 100 and all(len(m["recipients"]) == 100 for m in messages)
    assert sorted(r for m in messages for r in m["recipients"]) == sorted(recipients)


def test_a_recipient_the_hoster_defers_makes_sendmail_exit_75_quoting_the_reply(
        behind_tunnel, far_side, sendmail):
    far_side.refuse = {b"RCPT TO:<later@hoster.example>": "450 4.2.1 mailbox busy"}
    mm = behind_tunnel(up=True)                              # through the tunnel, live
    result = sendmail(mm, "-i", "ok@hoster.example,later@hoster.example", '"a,b"@hoster.example')
    assert result.returncode == 75
    assert result.stderr.decode().splitlines() == [
        "minimail: 1 of 3 recipients were not accepted, <later@hoster.example> with: "
        "450 4.2.1 mailbox busy"]
    taken, = far_side.taken
    assert taken.rcpts == [b"RCPT TO:<ok@hoster.example>", b"RCPT TO:<later@hoster.example>",
                           b'RCPT TO:<"a,b"@hoster.example>']
