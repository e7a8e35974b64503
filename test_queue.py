"""The queue: when the tunnel cannot be had, minimail takes the mail itself,
keeps it on disk, and delivers it once the hoster can be reached again.

The hoster "goes away" the way it does in life: this module's own sshd is
stopped (ssh is refused at once) and started again on the same port.  Real
clients (smtplib, swaks, a hand-driven socket) send the mail; a real SMTP
server (aiosmtpd) receives what the queue delivers.
"""

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time

import pytest

from conftest import (
    AS_ROOT, MINIMAIL, SWAKS, as_nobody, free_port, make_message, minimail_command, need,
    send_mail, wait_until)


def queued_as(reply):
    """The queue ID in a '250 2.0.0 queued as ID' reply (bytes or str)."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    match = re.search(r"queued as ([0-9A-F]{16})$", text.strip())
    assert match, text
    return match[1]


def submit(port, message, sender="cron@desktop.example", recipients=("admin@hoster.example",)):
    """smtplib, by hand after EHLO: the (code, reply) of DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("desktop.example")
        assert smtp.mail(sender)[0] == 250
        for recipient in recipients:
            assert smtp.rcpt(recipient)[0] == 250
        return smtp.data(message)


def without_received(content):
    """A delivered message without the Received: field minimail put on top."""
    assert content.startswith(b"Received: from "), content[:80]
    return re.sub(rb"\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", b"", content)


def read_to_the_end(reader):
    """What a client still gets: up to the end, or a reset."""
    try:
        return reader.read()
    except ConnectionResetError:
        return b""


def spool_files(queue):
    return {where: sorted(os.listdir(queue / where)) for where in ("tmp", "queued", "failed")}


def status_json(pidfile):
    return json.loads(minimail_command("status", "--json", "--pidfile", pidfile).stdout)


def wait_backoff_over(pidfile):
    wait_until(lambda: (status_json(pidfile)["tunnel"]["retry_at"] or 0) < time.time(), 70,
               "the tunnel's backoff to end")


# ---------------------------------------------------------------------------
# Taking the mail, and delivering it later
# ---------------------------------------------------------------------------

def test_mail_taken_while_the_hoster_is_away_arrives_once_when_it_is_back(
        queueing, hoster_reachable, hoster, tmp_path):
    hoster_reachable(False)
    mm = queueing()
    message = make_message("queued-smtplib")
    code, reply = submit(mm.port, message)                  # smtplib, which does not retry
    assert code == 250 and reply.startswith(b"2.0.0 queued as ")
    first = queued_as(reply)
    swaks_message = make_message("queued-swaks")
    if SWAKS or os.environ.get("CI"):
        need("swaks", SWAKS)
        (tmp_path / "mail.eml").write_bytes(swaks_message)
        sent = subprocess.run([SWAKS, "--server", "127.0.0.1", "--port", str(mm.port),
                               "--from", "cron@desktop.example", "--to", "admin@hoster.example",
                               "--data", f"@{tmp_path / 'mail.eml'}"], capture_output=True,
                              text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout
        assert re.search(r"<-  250 2\.0\.0 queued as [0-9A-F]{16}", sent.stdout)
    assert hoster.messages == []
    hoster_reachable(True)
    wait_until(lambda: len(hoster.messages) == (2 if SWAKS else 1), 15, "the queue to be delivered")
    delivered = {m.content.split(b"Subject: ")[1][:20]: m.content for m in hoster.messages}
    smtplib_copy = [c for c in delivered.values() if b"queued-smtplib" in c][0]
    assert without_received(smtplib_copy) == message                 # byte-identical
    assert re.match(rb"Received: from desktop\.example \(127\.0\.0\.1:\d+\)\r\n\tby \S+ "
                    rb"\(minimail [\d.]+\) with ESMTP id " + first.encode() + rb";\r\n\t", smtplib_copy)
    if SWAKS:
        swaks_copy = [c for c in delivered.values() if b"queued-swaks" in c][0]
        assert without_received(swaks_copy).startswith(swaks_message)
    time.sleep(1.5)                                         # and only once
    assert len(hoster.messages) == (2 if SWAKS else 1)
    assert spool_files(mm.queue) == {"tmp": [], "queued": [], "failed": []}
    log = mm.log()
    assert len(re.findall(r"tunnel up after", log)) == 1     # one ssh carried the queue
    assert re.search(rf"queue: {first} queued: \d+ bytes, 1 recipient\(s\)", log)
    assert re.search(rf"queue: {first}: 1 delivered, 0 deferred, 0 refused \(250\)", log)
    assert "admin@hoster.example" not in log and "queued-smtplib" not in log


def test_a_live_clients_tunnel_carries_the_queue(queueing, hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing(retry=600)                                # the schedule would wait 10 min
    for i in range(20):
        code, _ = submit(mm.port, make_message(f"queued-{i}"))
        assert code == 250
    hoster_reachable(True)
    wait_backoff_over(mm.pidfile)
    send_mail(mm.port, make_message("live"))                # through the tunnel, live
    wait_until(lambda: len(hoster.messages) == 21, 15, "all 21 mails")
    assert sorted(without_received(m.content) if m.content.startswith(b"Received")
                  else m.content for m in hoster.messages) == \
        sorted([make_message(f"queued-{i}") for i in range(20)] + [make_message("live")])
    log = mm.log()
    assert log.count("tunnel up after") == 1                # all over that one tunnel
    starts_after = log.rpartition("tunnel failed")[2].count("tunnel starting")
    assert starts_after == 1


def test_a_kill_9_loses_no_mail_that_got_250_and_keeps_none_that_did_not(
        own_sshd, hoster, hoster_reachable, minimail_process, minimail_to_kill, tmp_path):
    hoster_reachable(False)
    queue = tmp_path / "queue"
    args = ["--ssh", own_sshd.ssh, "--remote", f"127.0.0.1:{hoster.port}", "--queue", str(queue),
            "--queue-retry", "0.5", "--linger", "30", "hoster"]
    first = minimail_to_kill(*args)
    with socket.create_connection(("127.0.0.1", first.port), timeout=30) as client:
        reader = client.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        for command in (b"EHLO x", b"MAIL FROM:<cron@desktop.example>",
                        b"RCPT TO:<admin@hoster.example>", b"DATA"):
            client.sendall(command + b"\r\n")
            while (line := reader.readline())[3:4] == b"-":
                pass
            assert line[:1] in (b"2", b"3")
        client.sendall(make_message("half", size=3_000_000)[:1_500_000])   # mid-DATA...
        wait_until(lambda: os.listdir(queue / "tmp"), 10, "the draft to be written")
        first.proc.kill()                                   # ...kill -9
        first.proc.wait()
        assert b"250" not in read_to_the_end(reader)        # no 250 came
    assert spool_files(queue)["queued"] == []
    second = minimail_to_kill(*args)
    assert spool_files(queue) == {"tmp": [], "queued": [], "failed": []}   # leftovers gone
    code, reply = submit(second.port, make_message("whole"))
    assert code == 250                                      # queued: the hoster is away
    second.proc.kill()                                      # kill -9 right after the 250
    second.proc.wait()
    hoster_reachable(True)
    third = minimail_process(*args)                         # delivers at start
    wait_until(lambda: hoster.messages, 15, "the mail queued before the kill")
    time.sleep(1)
    assert [without_received(m.content) for m in hoster.messages] == [make_message("whole")]
    assert queued_as(reply) in third.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_answers_452_and_keeps_nothing_half_written(queueing, hoster_reachable,
                                                                tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        hoster_reachable(False)
        mm = queueing("--queue", small / "queue")
        filler = small / "filler"
        filler.write_bytes(b"x" * 1_950_000)               # ~140 KiB left
        code, reply = submit(mm.port, make_message("too-big-for-the-disk", size=600_000))
        assert (code, reply[:5]) == (452, b"4.3.1")
        assert spool_files(small / "queue") == {"tmp": [], "queued": [], "failed": []}
        filler.unlink()                                     # space again
        code, reply = submit(mm.port, make_message("fits-now", size=600_000))
        assert code == 250
        assert spool_files(small / "queue")["queued"] == [f"{queued_as(reply)}.msg"]
        assert re.search(r"queue: cannot (write|queue) a message: No space left on device", mm.log())
        assert mm.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


# ---------------------------------------------------------------------------
# Refusals and bounces
# ---------------------------------------------------------------------------

def bounces(hoster, to):
    """The delivery status notifications the hoster received for `to`."""
    return [m for m in hoster.messages if m.mail_from in ("", "<>") and m.rcpt_tos == [to]]


def test_refused_recipients_bounce_deferred_ones_wait(queueing, hoster_reachable, hoster):
    hoster.refuse = {"nobody@hoster.example": "550 5.1.1 no such user",
                     "later@hoster.example": "450 4.2.1 mailbox busy, try later"}
    hoster_reachable(False)
    mm = queueing(retry=0.5)
    code, reply = submit(mm.port, make_message("mixed"), sender="me@hoster.example",
                         recipients=("ok@hoster.example", "nobody@hoster.example",
                                     "later@hoster.example"))
    queue_id = queued_as(reply)
    hoster_reachable(True)
    wait_until(lambda: bounces(hoster, "me@hoster.example"), 15, "the bounce")
    delivered = [m for m in hoster.messages if m.mail_from == "me@hoster.example"]
    assert [m.rcpt_tos for m in delivered] == [["ok@hoster.example"]]
    dsn, = bounces(hoster, "me@hoster.example")
    text = dsn.content.decode()
    assert "Content-Type: multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; nobody@hoster.example" in text
    assert "Status: 5.1.1" in text and "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "Content-Type: text/rfc822-headers" in text and "Subject: mixed subject" in text
    assert "later@hoster.example" not in text and "mixed line 3" not in text   # header only
    listing = minimail_command("queue", "--queue", mm.queue)
    assert listing.returncode == 0
    assert re.search(rf"{queue_id} .* from <me@hoster\.example>  to 1: <later@hoster\.example>",
                     listing.stdout)
    assert "attempt(s); next try in" in listing.stdout
    assert "450 4.2.1 mailbox busy" in listing.stdout
    hoster.refuse.pop("later@hoster.example")               # the mailbox is free again
    wait_until(lambda: len(delivered_to(hoster, "later@hoster.example")) == 1, 15,
               "the deferred recipient")
    wait_until(lambda: spool_files(mm.queue)["failed"], 5, "the original to move to failed/")
    listing = json.loads(minimail_command("queue", "--json", "--queue", mm.queue).stdout)
    failed, = [m for m in listing["messages"] if m["state"] == "failed"]
    assert failed["id"] == queue_id and failed["failures"] == [
        {"recipient": "nobody@hoster.example", "reply": "550 5.1.1 no such user"}]
    assert len(bounces(hoster, "me@hoster.example")) == 1   # a bounce, once


def delivered_to(hoster, address):
    return [m for m in hoster.messages if address in m.rcpt_tos]


def test_mail_older_than_the_queue_lifetime_bounces_as_expired(queueing, hoster_reachable,
                                                               hoster):
    hoster_reachable(False)
    mm = queueing("--queue-lifetime", 0.00003, retry=0.3)   # 2.6 s
    code, reply = submit(mm.port, make_message("too-late"), sender="me@hoster.example")
    queue_id = queued_as(reply)
    mm.wait_for_log(rf"queue: {queue_id}: expired after", timeout=15)
    hoster_reachable(True)
    minimail_command("flush", "--pidfile", mm.pidfile)
    wait_until(lambda: bounces(hoster, "me@hoster.example"), 15, "the bounce")
    dsn, = bounces(hoster, "me@hoster.example")
    assert "Status: 4.4.7" in dsn.content.decode() and "not delivered in" in dsn.content.decode()
    assert not [m for m in hoster.messages if m.mail_from == "me@hoster.example"]
    assert spool_files(mm.queue)["failed"] == [f"{queue_id}.env", f"{queue_id}.msg"]  # + its end


def test_a_bounce_is_never_bounced(queueing, hoster_reachable, hoster):
    hoster.refuse = {"gone@hoster.example": "550 5.1.1 no such user"}
    hoster_reachable(False)
    mm = queueing(retry=0.3)
    code, reply = submit(mm.port, make_message("null-sender"), sender="",
                         recipients=("gone@hoster.example",))
    hoster_reachable(True)
    wait_until(lambda: spool_files(mm.queue)["failed"], 15, "the message to fail")
    time.sleep(1)
    assert hoster.messages == []                            # no bounce of a bounce
    assert "not bounced (it is a bounce, or has no sender)" in mm.log()


# ---------------------------------------------------------------------------
# What the queue receives: SMTP done right
# ---------------------------------------------------------------------------

class Dialogue:
    """A hand-driven SMTP client that may pipeline: send, then read replies."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.reader.readline()
            assert line, f"closed after {lines}"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, text):
        self.sock.sendall(text if isinstance(text, bytes) else text.encode() + b"\r\n")
        return self.reply()

    def close(self):
        self.reader.close()
        self.sock.close()


def greeted_dialogue(port):
    """A Dialogue past the greeting and EHLO."""
    talk = Dialogue(port)
    talk.reply()
    talk.command("EHLO desktop.example")
    return talk


def test_the_queue_speaks_smtp_as_a_server_should(queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing("--max-size", 100_000, "--idle-timeout", 2)
    talk = Dialogue(mm.port)
    assert re.match(rb"220 \S+ ESMTP minimail: the tunnel is down, mail is queued\r\n$", talk.reply())
    assert talk.command("MAIL FROM:<a@b>").startswith(b"503 5.5.1")      # EHLO first
    ehlo = talk.command("EHLO desktop.example")
    for keyword in (b"PIPELINING", b"SIZE 100000", b"8BITMIME", b"SMTPUTF8",
                    b"ENHANCEDSTATUSCODES"):
        assert keyword in ehlo
    assert b"STARTTLS" not in ehlo and b"AUTH" not in ehlo
    starttls = talk.command("STARTTLS")
    assert starttls.startswith(b"502 5.5.1 STARTTLS is not offered here")
    assert talk.command("AUTH PLAIN AGZvbwBiYXI=").startswith(b"502 5.5.1 AUTH is not offered")
    assert talk.command("XYZZY").startswith(b"502 5.5.1")
    assert talk.command("VRFY root").startswith(b"252 ")
    assert talk.command("HELP").startswith(b"214 ")
    assert talk.command("NOOP").startswith(b"250 ")
    assert talk.command("RCPT TO:<a@b>").startswith(b"503 5.5.1")        # MAIL first
    assert talk.command("MAIL FROM:<a@b> SIZE=200000").startswith(b"552 5.3.4")
    assert talk.command("MAIL FROM:<a@b> FROB=1").startswith(b"555 5.5.4")
    assert talk.command(b"NOOP " + b"x" * 600 + b"\r\n").startswith(b"500 5.5.2")
    assert talk.command("MAIL FROM:<> BODY=8BITMIME SMTPUTF8").startswith(b"250")  # null sender
    assert talk.command("MAIL FROM:<a@b>").startswith(b"503 5.5.1")      # nested
    for i in range(100):
        assert talk.command(f"RCPT TO:<r{i}@hoster.example>").startswith(b"250")
    assert talk.command("RCPT TO:<r100@hoster.example>").startswith(b"452 4.5.3")
    assert talk.command("RSET").startswith(b"250")
    assert talk.command("DATA").startswith(b"503 5.5.1")
    talk.command("MAIL FROM:<a@b>")
    talk.command("RCPT TO:<c@d>")
    assert talk.command("DATA").startswith(b"354")
    talk.sock.sendall(b"x" * 1000 + b"\r\n" * 120 + b"y" * 200_000 + b"\r\n.\r\n")
    assert talk.reply().startswith(b"552 5.3.4")                         # --max-size
    assert talk.command("NOOP").startswith(b"250")                       # and the session goes on
    time.sleep(2.5)                                                      # --idle-timeout
    assert talk.reply().startswith(b"421 4.4.2")
    assert talk.reader.read() == b""
    talk.close()
    assert talk_closed_at_max_clients(queueing)


def talk_closed_at_max_clients(queueing):
    """--max-clients answers 421 4.3.2 first, queue or not."""
    mm = queueing("--max-clients", 1)
    first = Dialogue(mm.port)
    assert first.reply().startswith(b"220 ")
    second = Dialogue(mm.port)
    assert second.reply().startswith(b"421 4.3.2")
    first.close()
    second.close()
    return True


def test_a_client_that_drips_a_byte_at_a_time_is_cut_per_command(queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing("--idle-timeout", 1)
    talk = Dialogue(mm.port)
    assert talk.reply().startswith(b"220 ")
    started = time.monotonic()
    with pytest.raises(OSError):
        for byte in b"EHLO slowloris.example\r\n" * 10:
            talk.sock.sendall(bytes([byte]))              # a byte every 0.3 s: never idle
            time.sleep(0.3)
    assert time.monotonic() - started < 3                 # but no command within 1 s: cut
    talk.close()
    mm.wait_for_log(r"queue \(.*\): 0 message\(s\) queued; closed: idle for 1 s")


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n", b"\r.\n"]


def test_smuggling_and_bare_line_ends_deliver_exactly_the_messages_sent(queueing,
                                                                        hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing()
    talk = greeted_dialogue(mm.port)
    for i, payload in enumerate(SMUGGLING):
        talk.command("MAIL FROM:<cron@desktop.example>")
        talk.command("RCPT TO:<admin@hoster.example>")
        assert talk.command("DATA").startswith(b"354")
        smuggled = (b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@hoster.example>\r\n"
                    b"DATA\r\nSubject: smuggled\r\n\r\nforged\r\n")
        reply = talk.command(f"Subject: carrier {i}\r\n\r\nhello".encode() + payload + smuggled
                             + b"bare\nline\rends\r\n.\r\n")
        assert reply.startswith(b"250 2.0.0 queued as")
    talk.command("QUIT")
    talk.close()
    hoster_reachable(True)
    wait_until(lambda: len(hoster.messages) >= len(SMUGGLING), 15, "the queue")
    time.sleep(1)
    assert len(hoster.messages) == len(SMUGGLING)           # no more
    for message in hoster.messages:
        assert message.mail_from == "cron@desktop.example"
        assert message.rcpt_tos == ["admin@hoster.example"]
        body = without_received(message.content)
        assert b"Subject: smuggled" in body                 # carried inside, as text
        assert b"\n" not in body.replace(b"\r\n", b"") and b"\r" not in body.replace(b"\r\n", b"")


def test_pipelining_nul_bytes_8bit_text_and_20_mb_go_through_the_queue(queueing,
                                                                       hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing()
    talk = greeted_dialogue(mm.port)
    talk.sock.sendall(b"MAIL FROM:<cron@desktop.example> BODY=8BITMIME\r\n"
                      b"RCPT TO:<admin@hoster.example>\r\nRCPT TO:<root@hoster.example>\r\nDATA\r\n")
    replies = [talk.reply() for _ in range(4)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354"]
    odd = ("Subject: Grüße\r\n\r\nnul \x00 byte, 8-bit: Grüße aus Köln\r\n"
           ".leading dot\r\n").encode()
    assert talk.command(re.sub(rb"(?m)^\.", b"..", odd) + b".\r\n").startswith(b"250")
    big = b"".join(b"%07d " % i + b"z" * 90 + b"\r\n" for i in range(210_000))  # 20.8 MB
    talk.command("MAIL FROM:<cron@desktop.example>")
    talk.command("RCPT TO:<admin@hoster.example>")
    assert talk.command("DATA").startswith(b"354")
    assert talk.command(big + b".\r\n").startswith(b"250")
    talk.command("QUIT")
    talk.close()
    hoster_reachable(True)
    wait_until(lambda: len(hoster.messages) == 2, 60, "both messages")
    small, large = sorted(hoster.messages, key=lambda m: len(m.content))
    assert without_received(small.content) == odd
    assert sorted(small.rcpt_tos) == ["admin@hoster.example", "root@hoster.example"]
    assert without_received(large.content) == big


# ---------------------------------------------------------------------------
# Seeing and steering it
# ---------------------------------------------------------------------------

def test_queue_flush_and_status_show_and_steer_the_queue(queueing, hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing(retry=600)
    ids = [queued_as(submit(mm.port, make_message(f"wait-{i}"))[1]) for i in range(3)]
    listing = minimail_command("queue", "--queue", mm.queue)
    assert listing.returncode == 0
    assert listing.stdout.startswith(f"queue in {mm.queue}: 3 message(s) waiting, 0 failed\n")
    for queue_id in ids:
        assert re.search(rf"^{queue_id}  \d+ s old  \d+ bytes  from <cron@desktop\.example>  "
                         rf"to 1: <admin@hoster\.example>$", listing.stdout, re.M)
    as_json = json.loads(minimail_command("queue", "--json", "--queue", mm.queue).stdout)
    assert sorted(m["id"] for m in as_json["messages"]) == sorted(ids)
    state = status_json(mm.pidfile)["queue"]
    assert (state["count"], state["failed"], state["dir"]) == (3, 0, str(mm.queue))
    assert state["oldest"] <= time.time() and state["next_try"] > time.time() + 500
    shown = minimail_command("status", "--pidfile", mm.pidfile).stdout
    assert re.search(r"queue: 3 message\(s\) waiting, the oldest for \d+ s, next try in \d+ min",
                     shown)
    hoster_reachable(True)
    flushed = minimail_command("flush", "--pidfile", mm.pidfile)
    assert flushed.returncode == 0
    assert re.match(r"asked minimail \(pid \d+\) to deliver the queue now: 3 message\(s\) waiting",
                    flushed.stdout)
    wait_until(lambda: len(hoster.messages) == 3, 15, "the flush")
    wait_until(lambda: status_json(mm.pidfile)["queue"]["count"] == 0, 5, "the state file")
    assert minimail_command("queue", "--queue", mm.queue).stdout.startswith(
        f"queue in {mm.queue}: 0 message(s) waiting, 0 failed")


def test_flush_without_a_daemon_says_so(tmp_path):
    result = minimail_command("flush", "--pidfile", tmp_path / "minimail.pid")
    assert result.returncode == 1
    assert result.stderr == ("minimail is not running: nothing would deliver the queue (start it: "
                             "minimail start, or systemctl start minimail)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_user_who_cannot_read_the_queue_is_told_in_one_line(run_dir):
    import minimail
    queue = run_dir / "queue"
    queue.mkdir(mode=0o700)
    status, said = as_nobody(lambda _out: minimail.main(["queue", "--queue", str(queue)]))
    assert status == 1
    assert said == (f"minimail: cannot read the queue in {queue}: it belongs to root; listing it "
                    f"needs root (try sudo)\n")


def test_no_queue_gives_the_421_of_a_plain_relay(queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing("--no-queue")
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", mm.port, timeout=30)
    assert refused.value.smtp_code == 421
    assert "queue: off" in mm.log() and not mm.queue.exists()


def test_a_draining_minimail_refuses_even_with_a_queue(queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing()
    held = Dialogue(mm.port)
    assert held.reply().startswith(b"220 ")                 # a queue session, under way
    mm.proc.send_signal(signal.SIGTERM)
    mm.wait_for_log(r"waiting up to 10 s for 1 active session")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", mm.port), timeout=5)
    held.command("EHLO x")
    held.command("MAIL FROM:<a@b>")
    held.command("RCPT TO:<c@d>")
    held.command("DATA")
    assert held.command("Subject: x\r\n\r\nfinished during the drain\r\n.").startswith(b"250")
    held.command("QUIT")
    held.close()
    assert mm.proc.wait(timeout=15) == 0
    assert len(os.listdir(mm.queue / "queued")) == 1       # kept for the next start


def test_hostile_files_in_the_queue_are_left_alone_and_never_followed(tmp_path):
    queue = tmp_path / "queue"
    for where in ("tmp", "queued", "failed"):
        (queue / where).mkdir(parents=True)
    secret = tmp_path / "secret.json"                    # a file of root's the user may not read
    secret.write_text('{"id": "0661A1B8F0C3E2A7", "sender": "leaked@secret"}')
    queued = queue / "queued"
    (queued / "0661A1B8F0C3E2A7.env").symlink_to(secret)
    (queued / "0661A1B8F0C3E2A7.msg").write_bytes(b"MINIMAIL-ENVELOPE {}\r\n")
    (queued / "0661A1B8F0C3E2A8.msg").symlink_to("/etc/shadow")
    os.mkfifo(queued / "0661A1B8F0C3E2A9.msg")
    (queued / "0661A1B8F0C3E2AA.msg").write_bytes(b"Subject: no envelope line\r\n\r\nx\r\n")
    (queued / "0661A1B8F0C3E2AB.msg").write_bytes(b"MINIMAIL-ENVELOPE " + b"[" * 200_000 + b"\r\n")
    (queued / "..%2F..%2Fetc.msg").write_bytes(b"")
    listing = minimail_command("queue", "--queue", queue, timeout=20)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr
    assert listing.stdout.startswith(f"queue in {queue}: 0 message(s) waiting, 0 failed\n")
    assert "leaked" not in listing.stdout + listing.stderr and "root:" not in listing.stderr
    complaints = listing.stderr.splitlines()
    assert len(complaints) == 5 and all("has no valid envelope" in c and "left alone" in c
                                        for c in complaints)      # the odd name: not a message
    assert json.loads(minimail_command("queue", "--json", "--queue", queue).stdout)["messages"] == []


# ---------------------------------------------------------------------------
# Found in a second read of the merged queue: a SIZE in digits that are not
# ASCII, and a flush or delete that signals a daemon still starting
# ---------------------------------------------------------------------------

def test_a_size_in_digits_that_are_not_ascii_gets_a_reply_not_a_traceback(
        queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing()
    talk = greeted_dialogue(mm.port)
    assert talk.command("MAIL FROM:<a@b> SIZE=\u00b2").startswith(b"555 5.5.4")   # a superscript 2
    assert talk.command("MAIL FROM:<a@b> SIZE=12").startswith(b"250")         # the session goes on
    talk.close()
    time.sleep(0.5)
    assert "Traceback" not in mm.log()


def test_a_flush_or_delete_while_minimail_starts_never_kills_it(tmp_path):
    """`minimail flush` and `minimail delete` signal the pid they find (the pid
    file's, the queue lock's) as soon as it is there: a daemon still starting
    (here: clearing 20,000 leftovers from its queue's tmp/) must survive it."""
    queue = tmp_path / "queue"
    (queue / "tmp").mkdir(parents=True)
    for path in (queue, queue / "tmp"):
        path.chmod(0o700)
    for i in range(20_000):
        (queue / "tmp" / f"left-{i}").touch()
    log_path = tmp_path / "minimail.log"
    argv = [sys.executable, str(MINIMAIL), "--foreground", "--listen", f"127.0.0.1:{free_port()}",
            *AS_ROOT, "--queue", str(queue), "--ssh", "false", "hoster"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log_file)
    try:
        deadline = time.monotonic() + 30
        while not (queue / "lock").exists() or not (queue / "lock").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.001)
        assert int((queue / "lock").read_text()) == proc.pid
        assert list((queue / "tmp").iterdir()), "the start was over before the signals"
        os.kill(proc.pid, signal.SIGUSR2)                    # what `minimail delete` sends
        os.kill(proc.pid, signal.SIGUSR1)                    # what `minimail flush` sends
        wait_until(lambda: proc.poll() is not None or "listening on" in log_path.read_text(),
                   30, "minimail to listen")
        assert proc.poll() is None, f"minimail died (status {proc.returncode})"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
