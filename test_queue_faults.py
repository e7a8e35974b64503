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
    MINIMAIL, AS_ROOT, fill_disk, free_port, make_message, minimail_command,
    wait_until)


#: Queued mail is tried again after this long (the queueing fixture).
QUEUE_RETRY = 0.3


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
    wait_until(lambda: spool_files(mm.queue)["queued"] == [], 10,      # removed after the 250
               "the delivered ones to leave the queue")
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


# ---------------------------------------------------------------------------
# Two daemons on one queue (item 15)
# ---------------------------------------------------------------------------

def test_a_second_daemon_on_the_same_queue_refuses_to_start(queueing, hoster_reachable, run_dir):
    hoster_reachable(False)
    first = queueing(retry=600)
    queue_id = queued_as(submit(first.port, make_message("first-daemons"))[1])
    second = subprocess.Popen([sys.executable, MINIMAIL, "--foreground", "--listen",
                               f"127.0.0.1:{free_port()}", *AS_ROOT, "--queue", first.queue,
                               "hoster"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = second.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        second.kill()
        second.communicate()
        pytest.fail("a second daemon runs on the first one's queue")
    assert second.returncode == 1
    assert [line for line in stderr.splitlines() if not line.startswith("INFO ")] == [
        f"ERROR the queue {first.queue} is in use by another minimail (pid {first.proc.pid}): "
        f"two daemons must not share one queue"]
    started = minimail_command("start", *AS_ROOT, "--listen", f"127.0.0.1:{free_port()}",
                               "--pidfile", run_dir / "minimail.pid", "--logfile",
                               run_dir / "minimail.log", "--queue", first.queue, "hoster")
    assert started.returncode == 1
    assert started.stderr == (f"minimail: the queue {first.queue} is in use by another minimail "
                              f"(pid {first.proc.pid}): two daemons must not share one queue\n")
    lock = os.stat(first.queue / "lock")
    assert (oct(lock.st_mode & 0o777), lock.st_uid) == ("0o600", os.geteuid())
    assert (first.queue / "lock").read_text() == f"{first.proc.pid}\n"
    assert os.listdir(first.queue / "queued") == [f"{queue_id}.msg"]   # untouched
    still_up(first)


# ---------------------------------------------------------------------------
# The retry clock (item 16, the clock's half)
# ---------------------------------------------------------------------------

def test_retries_are_scheduled_on_the_monotonic_clock_and_never_wait_past_the_clamp():
    import minimail
    clock = {"monotonic": 1000.0, "wall": 1_800_000_000.0}
    schedule = minimail.Schedule(60, clocks=(lambda: clock["monotonic"], lambda: clock["wall"]))

    def envelope(queue_id, next_try, attempts=0, size=100):
        return minimail.Envelope(queue_id, "a@b", ["c@d"], clock["wall"], size,
                                 attempts=attempts, next_try=next_try)
    schedule["0661A1B8F0C3E2A7"] = soon = envelope("0661A1B8F0C3E2A7", clock["wall"] + 60)
    assert schedule.wait() == 60
    clock["wall"] -= 86400                                   # the wall clock steps back a day
    clock["monotonic"] += 30
    assert schedule.wait() == 30 and schedule.due() == []
    clock["monotonic"] += 30
    assert schedule.due() == [soon]                          # on time all the same
    schedule.retry_in(soon, 7200)                            # never more than RETRY_MAX
    assert schedule.wait() == minimail.RETRY_MAX
    hostile = envelope("0661A1B8F0C3E2A8", 9e14, attempts=3)  # next_try in 28 million years
    schedule["0661A1B8F0C3E2A8"] = hostile
    assert hostile.due == clock["monotonic"] + 240           # as the schedule would set it: 60 * 2**2
    assert schedule.bytes == 200 and len(schedule) == 2
    del schedule["0661A1B8F0C3E2A7"]
    assert schedule.bytes == 100 and schedule.pop("0661A1B8F0C3E2A8") is hostile
    assert (schedule.bytes, schedule.wait()) == (0, None)


#: Loaded as sitecustomize (through PYTHONPATH) by a minimail daemon in the
#: foreground whose environment names a control directory; changes nothing
#: anywhere else.  In the control directory:
#:   clock       N: time.time() runs N seconds behind (a wall clock stepped back)
#:   faults      "SEED CHANCE": while faults.on exists (and faults.off does not),
#:               each file operation on the queue's tmp/, queued/ and failed/
#:               (os.open, os.rename, os.link; os.unlink in queued/) fails with
#:               that chance: ENOSPC or EDQUOT where it makes a file, ENOENT or
#:               EIO where it reads one, ENOSPC or EIO for a rename, EIO for an
#:               unlink; each is written to `injected` as "CALL ERRNO DIR/*.EXT".
INJECTOR = r'''
import errno, os, random, sys, threading, time

CONTROL = os.environ.get("MINIMAIL_TEST_CONTROL")
if CONTROL and "--foreground" in sys.argv:
    _time, _monotonic, _exists = time.time, time.monotonic, os.path.exists
    _clock = {"looked": -1.0, "behind": 0.0}

    def _behind():
        now = _monotonic()
        if now - _clock["looked"] > 0.05:
            _clock["looked"] = now
            try:
                with open(os.path.join(CONTROL, "clock")) as f:
                    _clock["behind"] = float(f.read())
            except (OSError, ValueError):
                _clock["behind"] = 0.0
        return _clock["behind"]

    time.time = lambda: _time() - _behind()

    if _exists(os.path.join(CONTROL, "faults")):
        with open(os.path.join(CONTROL, "faults")) as f:
            _seed, _chance = f.read().split()
        _random, _chance, _lock = random.Random(int(_seed)), float(_chance), threading.Lock()
        _queue = os.environ["MINIMAIL_TEST_QUEUE"]
        _on, _off = os.path.join(CONTROL, "faults.on"), os.path.join(CONTROL, "faults.off")
        _open, _rename, _link, _unlink, _write = os.open, os.rename, os.link, os.unlink, os.write
        _injected = _open(os.path.join(CONTROL, "injected"),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

        def _fail(call, path, codes, where=("tmp", "queued", "failed")):
            path = path if isinstance(path, str) else ""
            parts = os.path.relpath(path, _queue).split(os.sep) if path.startswith(_queue) else []
            if len(parts) != 2 or parts[0] not in where or not _exists(_on) or _exists(_off):
                return
            with _lock:
                if _random.random() >= _chance:
                    return
                code = _random.choice(codes)
            kind = parts[1].rpartition(".")[2]
            _write(_injected, f"{call} {errno.errorcode[code]} {parts[0]}/*.{kind}\n".encode())
            raise OSError(code, os.strerror(code), path)

        def _open_faulty(path, flags, mode=0o777, **kw):
            made = flags & os.O_CREAT
            _fail("open", path, (errno.ENOSPC, errno.EDQUOT) if made else (errno.ENOENT, errno.EIO))
            return _open(path, flags, mode, **kw)

        def _rename_faulty(src, dst, **kw):
            _fail("rename", src, (errno.ENOSPC, errno.EIO))
            return _rename(src, dst, **kw)

        def _link_faulty(src, dst, **kw):
            _fail("link", dst, (errno.ENOSPC,))
            return _link(src, dst, **kw)

        def _unlink_faulty(path, **kw):
            _fail("unlink", path, (errno.EIO,), where=("queued",))
            return _unlink(path, **kw)

        os.open, os.rename, os.link, os.unlink = (_open_faulty, _rename_faulty, _link_faulty,
                                                  _unlink_faulty)
'''


@pytest.fixture
def control(tmp_path, monkeypatch):
    """A control directory for INJECTOR, and the environment that makes the
    next minimail started load it (its queue: tmp_path/queue)."""
    directory = tmp_path / "control"
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(INJECTOR)
    monkeypatch.setenv("PYTHONPATH", str(directory))
    monkeypatch.setenv("MINIMAIL_TEST_CONTROL", str(directory))
    monkeypatch.setenv("MINIMAIL_TEST_QUEUE", str(tmp_path / "queue"))
    return directory


def deferrals(mm, queue_id):
    return mm.log().count(f"queue: {queue_id}: deferred")


def test_a_wall_clock_stepped_back_or_a_next_try_far_ahead_never_holds_a_retry(
        queueing, hoster_reachable, hoster, control, tmp_path):
    hoster_reachable(False)
    queue = tmp_path / "queue"
    first = queueing("--queue", queue, retry=600)
    queue_id = queued_as(submit(first.port, make_message("on-time"))[1])
    assert first.stop() == 0
    envelope = queue / "queued" / f"{queue_id}.env"          # a next_try 28 million years ahead
    stored = (queue / "queued" / f"{queue_id}.msg").read_bytes().split(b"\r\n")[0]
    envelope.write_text(json.dumps({**json.loads(stored[len(b"MINIMAIL-ENVELOPE "):]),
                                    "next_try": 9e14}))
    mm = queueing("--queue", queue, retry=0.5)
    wait_until(lambda: deferrals(mm, queue_id) >= 2, 15, "retries within the clamp")
    (control / "clock").write_text("86400")                 # the wall clock steps back a day
    tries = deferrals(mm, queue_id)
    wait_until(lambda: deferrals(mm, queue_id) >= tries + 2, 15, "retries on time all the same")
    state = json.loads(minimail_command("status", "--json", "--pidfile", mm.pidfile).stdout)
    assert state["updated"] < time.time() - 86000            # the daemon's clock is a day behind
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: delivered(hoster, "on-time"), 20, "the mail")
    still_up(mm)


# ---------------------------------------------------------------------------
# minimail delete
# ---------------------------------------------------------------------------

def test_delete_removes_waiting_and_failed_mail_with_the_daemon_running(
        queueing, hoster_reachable, hoster):
    hoster.refuse = {"nobody@hoster.example": "550 5.1.1 no such user"}
    hoster_reachable(False)
    mm = queueing(retry=0.5)
    failing = queued_as(submit(mm.port, make_message("will-fail"), sender="",
                               recipients=("nobody@hoster.example",))[1])
    waiting = [queued_as(submit(mm.port, make_message(f"deleted-{i}"))[1]) for i in range(2)]
    kept = queued_as(submit(mm.port, make_message("kept"))[1])
    listing = minimail_command("queue", "--queue", mm.queue).stdout
    assert listing.endswith("(minimail flush: deliver now; minimail delete ID...: remove mail, "
                            "without a bounce)\n")
    mm.wait_for_log(rf"queue: {waiting[0]}: next try in")
    hoster.refuse["admin@hoster.example"] = "451 4.3.0 not now"   # the others wait on
    hoster_reachable(True)
    flush(mm)
    wait_until(lambda: (mm.queue / "failed" / f"{failing}.msg").exists(), 20, "one to fail")
    unknown = "0661A1B8F0C3E2A7"
    result = minimail_command("delete", "--queue", mm.queue, waiting[0], failing,
                              waiting[1].lower(), unknown)
    assert result.returncode == 1
    assert result.stdout == (f"deleted {waiting[0]} (it was waiting)\n"
                             f"deleted {failing} (it had failed)\n"
                             f"deleted {waiting[1]} (it was waiting)\n")
    assert result.stderr == f"minimail: no message {unknown} in the queue in {mm.queue}\n"
    assert spool_files(mm.queue) == {"tmp": [], "queued": [f"{kept}.env", f"{kept}.msg"],
                                     "failed": []}
    for queue_id in waiting:
        mm.wait_for_log(rf"queue: {queue_id}: deleted")
    hoster.refuse.pop("admin@hoster.example")
    flush(mm)
    wait_until(lambda: delivered(hoster, "kept"), 20, "the one kept")
    time.sleep(1)
    assert [m for m in hoster.messages if b"deleted-" in m.content] == []   # never delivered
    assert spool_files(mm.queue) == {"tmp": [], "queued": [], "failed": []}   # nor written back
    status = json.loads(minimail_command("status", "--json", "--pidfile", mm.pidfile).stdout)
    assert (status["queue"]["count"], status["queue"]["failed"]) == (0, 0)
    still_up(mm)


def test_delete_without_a_daemon_and_with_bad_ids(queueing, hoster_reachable, tmp_path):
    hoster_reachable(False)
    mm = queueing(retry=600)
    ids = [queued_as(submit(mm.port, make_message(f"offline-{i}"))[1]) for i in range(2)]
    assert mm.stop() == 0
    result = minimail_command("delete", "--queue", mm.queue, ids[0])
    assert (result.returncode, result.stdout, result.stderr) == (
        0, f"deleted {ids[0]} (it was waiting)\n", "")
    assert spool_files(mm.queue)["queued"] == [f"{ids[1]}.msg"]
    result = minimail_command("delete", "--queue", mm.queue, ids[0])
    assert (result.returncode, result.stderr) == (
        1, f"minimail: no message {ids[0]} in the queue in {mm.queue}\n")
    result = minimail_command("delete", "--queue", mm.queue, "../../etc/passwd")
    assert result.returncode == 2 and result.stderr.startswith(
        "minimail: '../../etc/passwd' is not a queue ID (16 hex digits, as `minimail queue` "
        "shows them)\n")
    result = minimail_command("delete", "--queue", tmp_path / "nowhere", ids[1])
    assert result.returncode == 1 and "no message" in result.stderr
    assert "minimail delete [options] ID..." in minimail_command("--help").stdout


# ---------------------------------------------------------------------------
# Random faults in every step of the runner, and a hoster that resets
# ---------------------------------------------------------------------------

class Reset(Exception):
    """The flaky hoster resets this connection now."""


class FlakyHoster:
    """A small SMTP server in threads standing in for a hoster that misbehaves.
    mode "silent": it accepts and resets the connection without a word;
    "flaky": at each step (its greeting, the replies to EHLO, MAIL,
    RCPT, DATA, and the final dot before it keeps the message) it resets the
    connection with a seeded chance; "good".  It refuses `refused` (550) and
    keeps every message it answered 250 to: (sender, recipients, text)."""

    def __init__(self, seed, chance=0.12):
        self.random, self.chance, self.lock = random.Random(seed), chance, threading.Lock()
        self.mode, self.refused = "silent", {"refused@hoster.example"}
        self.messages, self.resets = [], {}
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.accept, daemon=True)
        self.thread.start()

    def accept(self):
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.listener.close()

    def reset_now(self, step):
        with self.lock:
            if self.mode != "flaky" or self.random.random() >= self.chance:
                return False
            self.resets[step] = self.resets.get(step, 0) + 1
            return True

    def serve(self, conn):
        with conn:
            conn.settimeout(30)
            try:
                if self.mode == "silent":
                    raise Reset
                self.dialogue(conn, conn.makefile("rb"))
            except Reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            except OSError:
                pass

    def dialogue(self, conn, reader):
        def reply(step, text):
            if self.reset_now(step):
                raise Reset
            conn.sendall(text.encode() + b"\r\n")
        reply("greeting", "220 hoster.example ESMTP")
        sender, recipients = None, []
        for _ in range(1000):
            line = reader.readline(2048)
            verb, _, argument = line.decode("utf-8", "replace").strip().partition(" ")
            address = argument.partition("<")[2].partition(">")[0]
            if not line or verb.upper() == "QUIT":
                return conn.sendall(b"221 bye\r\n") if line else None
            if verb.upper() in ("EHLO", "HELO"):
                reply("EHLO", "250-hoster.example\r\n250-8BITMIME\r\n250 SIZE 100000000")
            elif verb.upper() == "MAIL":
                sender, recipients = address, []
                reply("MAIL", "250 2.1.0 ok")
            elif verb.upper() == "RCPT" and address in self.refused:
                reply("RCPT", "550 5.1.1 no such user")
            elif verb.upper() == "RCPT":
                recipients.append(address)
                reply("RCPT", "250 2.1.5 ok")
            elif verb.upper() == "DATA":
                reply("DATA", "354 go on")
                text = self.read_data(reader)
                if self.reset_now("dot"):
                    raise Reset
                with self.lock:
                    self.messages.append((sender, list(recipients), text))
                conn.sendall(b"250 2.0.0 stored\r\n")
            else:
                reply(verb.upper(), "250 2.0.0 ok" if verb.upper() in ("RSET", "NOOP") else "502 no")

    @staticmethod
    def read_data(reader):
        lines = []
        for _ in range(1_000_000):
            line = reader.readline(65536)
            if not line or line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)
        return b"".join(lines)


#: The five kinds of message the fault test sends: (sender, recipients);
#: "ok" stands for a recipient of that message's own.
KINDS = [("me@hoster.example", ["ok"]), ("me@hoster.example", ["ok", "refused@hoster.example"]),
         ("me@hoster.example", ["refused@hoster.example"]), ("", ["ok"]),
         ("", ["refused@hoster.example"])]


def fault_test_message(i):
    sender, recipients = KINDS[i % len(KINDS)]
    return (sender, [f"ok-{i}@hoster.example" if r == "ok" else r for r in recipients],
            f"Subject: fault-{i}\r\n\r\nmessage {i}\r\n".encode())


def try_to_submit(port, i):
    """(code, reply) of a submission; (None, why) if the connection broke."""
    sender, recipients, text = fault_test_message(i)
    try:
        return submit(port, text, sender=sender, recipients=recipients)
    except (smtplib.SMTPException, OSError) as exc:
        return None, str(exc).encode()


def test_random_faults_in_every_step_of_the_runner_lose_no_mail_and_never_stop_the_daemon(
        own_sshd, hoster_reachable, control, minimail_process, tmp_path):
    """A real minimail, a real ssh tunnel, and a hoster of the test's own
    (FlakyHoster).  The faults are injected into the real process: the test
    puts INJECTOR on PYTHONPATH as sitecustomize, which wraps os.open,
    os.rename, os.link and os.unlink in the minimail process so that, with a
    seeded chance, an operation on a file of the queue fails with ENOSPC,
    EDQUOT, ENOENT or EIO (every step of the runner: opening a message,
    saving its envelope, queueing its bounce, moving it to failed/, removing
    it; and the intake, which then answers 452).  The hoster resets the
    connection at random steps.  After many rounds of flushes the faults
    stop, and every message that got 250 must have been delivered to each of
    its recipients exactly once, or bounced (once, to a sender that is not
    null) and kept in failed/; none may be left, and the daemon must never
    have stopped.  The seed is printed; MINIMAIL_FAULT_SEED=N repeats it."""
    seed = int(os.environ.get("MINIMAIL_FAULT_SEED") or random.randrange(1 << 32))
    print(f"fault injection seed: {seed} (MINIMAIL_FAULT_SEED={seed} repeats it)")
    (control / "faults").write_text(f"{seed} 0.12")
    hoster = FlakyHoster(seed)
    hoster_reachable(False)
    try:
        mm = minimail_process("--ssh", own_sshd.ssh, "--remote", f"127.0.0.1:{hoster.port}",
                              "--queue", tmp_path / "queue", "--queue-retry", 0.2,
                              "--linger", 30, "--jitter", 0, "hoster")
        (control / "faults.on").touch()
        accepted, refused = {}, 0                # i -> queue ID (None: delivered live)
        for i in range(60):                      # the hoster is away: all to the queue
            code, reply = try_to_submit(mm.port, i)
            if code == 250:
                accepted[i] = queued_as(reply)
            else:
                refused += 1
                assert code == 452, (code, reply)      # a fault in the intake: try again later
        hoster.mode = "flaky"
        hoster_reachable(True)
        for i in range(60, 100):                 # flushes, and mail through the tunnel too
            mm.proc.send_signal(signal.SIGUSR1)
            code, reply = try_to_submit(mm.port, i * 5)         # kind 0: one recipient, no 550
            if code == 250:
                accepted[i * 5] = queued_as(reply) if b"queued as" in reply else None
            time.sleep(0.25)
        (control / "faults.off").touch()
        hoster.mode = "good"

        def settled():
            mm.proc.send_signal(signal.SIGUSR1)
            time.sleep(0.3)
            return not os.listdir(tmp_path / "queue" / "queued")
        wait_until(settled, 60, "the queue to settle once the faults stopped")
        time.sleep(1)
        still_up(mm)
        injected = (control / "injected").read_text().splitlines()
        outcomes = check_every_250(accepted, hoster.messages, tmp_path / "queue")
        steps = {}
        for line in injected:
            steps[line] = steps.get(line, 0) + 1
        print(f"faults injected: {len(injected)}: {json.dumps(steps, sort_keys=True)}")
        print(f"hoster resets: {sum(hoster.resets.values())}: {json.dumps(hoster.resets)}")
        print(f"messages: {len(accepted)} got 250, {refused} got 452; outcomes: "
              f"{json.dumps(outcomes)}; log lines: "
              f"{mm.log().count('stays in the queue')} kept after a failed step, "
              f"{mm.log().count('cannot queue its bounce')} bounces that waited, "
              f"{mm.log().count('deferred')} deferrals")
        assert len(injected) >= 20 and sum(hoster.resets.values()) >= 5
    finally:
        hoster.stop()


def check_every_250(accepted, messages, queue):
    """Every message that got 250: delivered to each recipient once, or bounced once."""
    outcomes = {"delivered": 0, "bounced": 0, "failed, no bounce (null sender)": 0,
                "delivered live": 0}
    for i, queue_id in accepted.items():
        sender, recipients, text = fault_test_message(i)
        marker = f"Subject: fault-{i}\r\n".encode()
        copies = [m for m in messages if marker in m[2] and not m[0] == ""] if sender else \
            [m for m in messages if marker in m[2] and b"X-Minimail-Queue-ID" not in m[2]]
        for recipient in recipients:
            got = [m for m in copies if recipient in m[1]]
            if recipient.startswith("ok-"):
                assert len(got) == 1, (i, queue_id, recipient, len(got))
            else:
                assert got == [], (i, queue_id, recipient)
        if queue_id is None:
            outcomes["delivered live"] += 1
            continue
        dsns = [m for m in messages if m[0] == "" and
                f"X-Minimail-Queue-ID: {queue_id}".encode() in m[2]]
        failed = sorted(p for p in os.listdir(queue / "failed") if p.startswith(queue_id))
        if "refused@hoster.example" in recipients:
            assert failed == [f"{queue_id}.env", f"{queue_id}.msg"], (i, queue_id, failed)
            assert len(dsns) == (1 if sender else 0), (i, queue_id, len(dsns))
            outcomes["bounced" if sender else "failed, no bounce (null sender)"] += 1
        else:
            assert failed == [] and dsns == [], (i, queue_id)
            outcomes["delivered"] += 1
    return outcomes
