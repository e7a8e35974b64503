"""The queue keeps its promise under faults: a full disk, a file removed by
hand, a queue at its cap, two daemons on one queue, a clock stepped back,
`minimail delete`, and random faults in every step of the runner.

The promise: a 250 means the mail goes out (or back to its sender as a
bounce), and nothing a far side, a full disk or a hand in the queue does
stops the daemon.  The disk fills for real (a small tmpfs of the test's own);
the hoster goes away as in test_queue (this module's sshd is stopped); the
hoster that resets connections, and the faults inside minimail, are
described where they are used.
"""

import errno
import json
import os
import random
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import (
    MINIMAIL, AS_ROOT, fill_disk, free_port, make_message, minimail_command, minimail_via,
    wait_until)


@pytest.fixture
def queueing(own_sshd, hoster, minimail_process, tmp_path):
    """minimail in front of this module's sshd and the hoster (aiosmtpd),
    retrying queued mail after `retry` seconds, with a pid file."""
    def start(*args, retry=0.3, linger=30):
        pidfile = tmp_path / f"minimail-{free_port()}.pid"
        mm = minimail_via(own_sshd, hoster, minimail_process, linger)(
            "--queue-retry", retry, "--pidfile", pidfile, *args)
        mm.pidfile = pidfile
        return mm
    return start


def submit(port, message, sender="cron@desktop.example", recipients=("admin@hoster.example",),
           size=None):
    """One SMTP transaction, by hand after EHLO: the (code, reply) of the step
    that ended it (MAIL, RCPT or DATA)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        smtp.ehlo("desktop.example")
        code, reply = smtp.mail(sender, [f"SIZE={size}"] if size is not None else [])
        if code != 250:
            return code, reply
        for recipient in recipients:
            code, reply = smtp.rcpt(recipient)
            if code != 250:
                return code, reply
        return smtp.data(message)


def sized_message(marker, size):
    """A message of about size bytes (a Subject: marker, lines of 80 bytes)."""
    head = f"From: cron@desktop.example\r\nSubject: {marker}\r\n\r\n".encode()
    return head + (b"x" * 78 + b"\r\n") * max(0, (size - len(head)) // 80)


def queued_as(reply):
    """The queue ID in a '250 2.0.0 queued as ID' reply."""
    match = re.search(rb"queued as ([0-9A-F]{16})$", reply.strip())
    assert match, reply
    return match[1].decode()


def spool_files(queue):
    return {where: sorted(os.listdir(queue / where)) for where in ("tmp", "queued", "failed")}


def flush(mm):
    """`minimail flush`: deliver now (and end ssh's backoff)."""
    assert minimail_command("flush", "--pidfile", mm.pidfile).returncode == 0


def delivered(hoster, marker):
    return [m for m in hoster.messages if marker.encode() in m.content]


def bounces_for(hoster, queue_id):
    return [m for m in hoster.messages
            if m.mail_from in ("", "<>") and f"X-Minimail-Queue-ID: {queue_id}".encode() in m.content]


def still_up(mm):
    assert mm.proc.poll() is None, mm.log()
    assert "a part of minimail failed" not in mm.log() and "Traceback" not in mm.log()


# ---------------------------------------------------------------------------
# A full disk (item 1)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("full", ["blocks", "inodes"])
def test_a_full_disk_never_stops_the_daemon_and_every_250_is_delivered_once_space_is_back(
        full, queueing, hoster_reachable, hoster, small_disk):
    disk = small_disk("4m", inodes=64 if full == "inodes" else None)
    queue = disk / "queue"
    hoster_reachable(False)
    mm = queueing("--queue", queue)
    code, reply = submit(mm.port, make_message("before-the-disk-filled"))
    assert code == 250
    queue_id = queued_as(reply)
    filler = fill_disk(disk, inodes=(full == "inodes"))
    mm.wait_for_log(rf"queue: {queue_id}: cannot save its envelope \(No space left on device\)")
    tries = mm.log().count(f"queue: {queue_id}: deferred")
    wait_until(lambda: mm.log().count(f"queue: {queue_id}: deferred") >= tries + 2, 15,
               "two more retries on the full disk")
    code, reply = submit(mm.port, make_message("while-the-disk-is-full"))
    assert (code, reply[:5]) == (452, b"4.3.1")              # new mail: try again later
    still_up(mm)
    assert mm.stop() == 0                                    # a restart, the disk still full
    mm = queueing("--queue", queue)
    mm.wait_for_log(rf"queue: {queue_id}: deferred")
    time.sleep(1)
    still_up(mm)
    for path in filler:                                      # space again
        path.unlink()
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: delivered(hoster, "before-the-disk-filled"), 20, "the mail")
    time.sleep(1)
    assert len(hoster.messages) == 1                          # once
    assert spool_files(queue) == {"tmp": [], "queued": [], "failed": []}
    still_up(mm)


def test_a_550_while_the_disk_is_full_keeps_the_refused_recipient_until_its_bounce_is_queued(
        queueing, hoster_reachable, hoster, small_disk):
    disk = small_disk("4m")
    queue = disk / "queue"
    hoster.refuse = {"nobody@hoster.example": "550 5.1.1 no such user"}
    hoster_reachable(False)
    mm = queueing("--queue", queue, retry=600)
    code, reply = submit(mm.port, make_message("half-refused"), sender="me@hoster.example",
                         recipients=("ok@hoster.example", "nobody@hoster.example"))
    queue_id = queued_as(reply)
    filler = fill_disk(disk)
    hoster_reachable(True)
    flush(mm)
    mm.wait_for_log(rf"queue: {queue_id}: cannot queue its bounce \(No space left on device\): "
                    rf"its refused recipient\(s\) stay to do")
    assert [m.rcpt_tos for m in hoster.messages] == [["ok@hoster.example"]]
    assert spool_files(queue)["failed"] == []                # never failed/ without a bounce
    assert spool_files(queue)["queued"][-1] == f"{queue_id}.msg"
    still_up(mm)
    for path in filler:
        path.unlink()
    flush(mm)                                                 # the 550 again: now it bounces
    wait_until(lambda: bounces_for(hoster, queue_id), 20, "the bounce")
    wait_until(lambda: spool_files(queue)["failed"] == [f"{queue_id}.env", f"{queue_id}.msg"],
               10, "the original to move to failed/ with its envelope")
    assert [m.rcpt_tos for m in hoster.messages if m.mail_from not in ("", "<>")] == \
        [["ok@hoster.example"]]
    assert len(bounces_for(hoster, queue_id)) == 1
    listing = json.loads(minimail_command("queue", "--json", "--queue", queue).stdout)
    assert [(m["id"], m["state"]) for m in listing["messages"]] == [(queue_id, "failed")]
    still_up(mm)


# ---------------------------------------------------------------------------
# A message removed by hand (item 2)
# ---------------------------------------------------------------------------

def test_a_message_removed_by_hand_is_forgotten_and_every_other_one_is_delivered(
        queueing, hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing(retry=0.3)
    ids = [queued_as(submit(mm.port, make_message(f"by-hand-{i}"))[1]) for i in range(4)]
    mm.wait_for_log(rf"queue: {ids[1]}: next try in")        # a retry wrote its envelope
    (mm.queue / "queued" / f"{ids[1]}.msg").unlink()           # rm queued/ID.msg
    mm.wait_for_log(rf"queue: {ids[1]}: its message file is gone \(removed by hand\?\): forgotten")
    retries = mm.log().count(f"queue: {ids[2]}: deferred")
    wait_until(lambda: mm.log().count(f"queue: {ids[2]}: deferred") >= retries + 2, 15,
               "two more retries")
    assert f"{ids[1]}.env" not in spool_files(mm.queue)["queued"]    # never written again
    (mm.queue / "queued" / f"{ids[2]}.msg").unlink()           # and one just before delivery
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: len(hoster.messages) == 2, 20, "the other two")
    assert sorted(m.content.split(b"Subject: ")[1][:9] for m in hoster.messages) == \
        [b"by-hand-0", b"by-hand-3"]
    mm.wait_for_log(rf"queue: {ids[2]}: its message file is gone")
    assert spool_files(mm.queue) == {"tmp": [], "queued": [], "failed": []}
    still_up(mm)


def test_a_message_removed_while_it_waits_to_expire_is_forgotten_at_expiry(
        queueing, hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing("--queue-lifetime", 0.00003, retry=600)     # 2.6 s; no retry before
    kept = queued_as(submit(mm.port, make_message("expires"), sender="me@hoster.example")[1])
    gone = queued_as(submit(mm.port, make_message("removed"), sender="me@hoster.example")[1])
    (mm.queue / "queued" / f"{gone}.msg").unlink()
    time.sleep(3)
    flush(mm)                                                 # the runner looks: both expired
    mm.wait_for_log(rf"queue: {gone}: its message file is gone \(removed by hand\?\): forgotten")
    mm.wait_for_log(rf"queue: {kept}: bounced as")
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: bounces_for(hoster, kept), 20, "the bounce of the one that expired")
    assert bounces_for(hoster, gone) == []
    wait_until(lambda: spool_files(mm.queue)["queued"] == [], 10, "the queue to empty")
    assert spool_files(mm.queue)["failed"] == [f"{kept}.env", f"{kept}.msg"]
    still_up(mm)


# ---------------------------------------------------------------------------
# The queue's cap and its disk's reserve (item 13)
# ---------------------------------------------------------------------------

def test_past_its_cap_the_queue_answers_452_and_delivers_what_it_took(
        queueing, hoster_reachable, hoster):
    hoster_reachable(False)
    mm = queueing("--max-queue-size", 12_000, retry=600)
    taken = [submit(mm.port, make_message(f"within-the-cap-{i}", size=5000)) for i in range(3)]
    assert [code for code, _ in taken] == [250, 250, 250]    # 3 x 3.6 KB: 10.7 KB of 12 KB
    code, reply = submit(mm.port, make_message("past-the-cap", size=5000))
    assert (code, reply) == (452, b"4.3.1 minimail: the queue is full, try again later")
    code, reply = submit(mm.port, make_message("announced"), size=5000)
    assert (code, reply) == (452, b"4.3.1 minimail: the queue is full, try again later")
    code, reply = submit(mm.port, make_message("small", size=40), size=1000)
    assert code == 250                                       # what still fits is taken
    log = mm.log()
    assert re.search(r"queue: cannot queue a message: the queue holds 10\d\d\d bytes in 3 "
                     r"message\(s\), --max-queue-size is 12000 \(refused after DATA, 3\d\d\d "
                     r"bytes\)", log)
    assert "(refused at MAIL, SIZE=5000)" in log
    assert "hoster.example" not in log and "past-the-cap" not in log
    assert sorted(os.listdir(mm.queue / "queued")) == sorted(
        f"{queued_as(reply)}.msg" for _, reply in taken + [(code, reply)])
    still_up(mm)
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: len(hoster.messages) == 4, 20, "the mail the queue took")
    assert sorted(re.search(rb"Subject: (\S+)", m.content)[1] for m in hoster.messages) == \
        [b"small", b"within-the-cap-0", b"within-the-cap-1", b"within-the-cap-2"]
    wait_until(lambda: json.loads(minimail_command("status", "--json", "--pidfile", mm.pidfile)
                                  .stdout)["queue"]["count"] == 0, 10, "the queue to empty")
    hoster_reachable(False)                                  # room again
    assert submit(mm.port, make_message("room-again", size=5000))[0] == 250
    still_up(mm)


def test_the_queue_keeps_a_reserve_on_its_disk_for_its_own_bounces(
        queueing, hoster_reachable, hoster, small_disk):
    disk = small_disk("4m")                                  # 1 % is less than 64 KiB: 64 KiB
    hoster.refuse = {"nobody@hoster.example": "550 5.1.1 no such user"}
    hoster_reachable(False)
    mm = queueing("--queue", disk / "queue", retry=600)
    fill_disk(disk, leave=200 << 10)
    code, reply = submit(mm.port, sized_message("fits", 60_000), sender="me@hoster.example",
                         recipients=("nobody@hoster.example",))
    assert code == 250                                       # 200 - 60 KB leaves 140 KB
    queue_id = queued_as(reply)
    code, reply = submit(mm.port, sized_message("would-eat-the-reserve", 100_000))
    assert (code, reply[:5]) == (452, b"4.3.1")              # 140 - 100 KB < 64 KiB
    code, reply = submit(mm.port, make_message("announced"), size=100_000)
    assert (code, reply[:5]) == (452, b"4.3.1")              # at MAIL
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    assert free > 64 << 10                                   # the reserve is still there...
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: bounces_for(hoster, queue_id), 20, "the bounce, written in the reserve")
    wait_until(lambda: spool_files(disk / "queue")["failed"] == [f"{queue_id}.env",
                                                                 f"{queue_id}.msg"], 10, "failed/")
    still_up(mm)
