"""minimail's pure logic, unit by unit, in milliseconds: the supervisor's
decisions (every transition), its backoff and exit verdicts, the clock pair
that notices a suspend, the DATA reader that stops SMTP smuggling, the
sendmail command's parsing, and what is read from outside (state files,
envelopes, ssh's words).  A few tests run the supervisor itself in-process
with real child processes and small timings, where end-to-end tests would
have to wait seconds.
"""

import json
import os
import re
import subprocess
import sys
import time

import gevent
import pytest
from docopt import docopt
from hypothesis import given, settings, strategies as st

import minimail
from minimail import Action, Facts, Phase, Plan, decide
from conftest import free_port

WAIT = 30.0


def facts(phase=Phase.DOWN, clients=0, now=100.0, launched_at=None, countdown_ends=None,
          retry_at=0.0, closing=False, endpoint_busy=False):
    return Facts(now, phase, clients, launched_at, countdown_ends, retry_at, closing, endpoint_busy)


# ---------------------------------------------------------------------------
# decide(): every transition
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    # no tunnel
    (facts(), Plan(Action.NOTHING, None)),                               # nobody needs one
    (facts(clients=1), Plan(Action.LAUNCH, None)),                       # a client: start it
    (facts(clients=3, retry_at=104.0), Plan(Action.NOTHING, 104.0)),     # backing off: wait
    (facts(clients=1, retry_at=100.0), Plan(Action.LAUNCH, None)),       # the backoff is over
    (facts(clients=1, closing=True), Plan(Action.NOTHING, None)),        # minimail stops
    # an old child is being stopped
    (facts(Phase.STOPPING, clients=1), Plan(Action.LAUNCH, None)),       # a fresh one at once
    (facts(Phase.STOPPING, clients=1, retry_at=101.0), Plan(Action.NOTHING, 101.0)),
    (facts(Phase.STOPPING, clients=1, endpoint_busy=True), Plan(Action.NOTHING, None)),  # TCP port
    (facts(Phase.STOPPING), Plan(Action.NOTHING, None)),
    # starting
    (facts(Phase.STARTING, clients=1, launched_at=90.0), Plan(Action.NOTHING, 120.0)),
    (facts(Phase.STARTING, clients=1, launched_at=70.0), Plan(Action.GIVE_UP, None)),   # --wait
    (facts(Phase.STARTING, launched_at=90.0), Plan(Action.START_COUNTDOWN, 120.0)),  # client left
    (facts(Phase.STARTING, launched_at=90.0, countdown_ends=105.0), Plan(Action.NOTHING, 105.0)),
    # up
    (facts(Phase.UP, clients=2), Plan(Action.NOTHING, None)),
    (facts(Phase.UP, clients=1, countdown_ends=110.0), Plan(Action.CANCEL_COUNTDOWN, None)),
    (facts(Phase.UP, clients=1, countdown_ends=90.0), Plan(Action.CANCEL_COUNTDOWN, None)),  # never under a client
    (facts(Phase.UP), Plan(Action.START_COUNTDOWN, None)),               # the last client left
    (facts(Phase.UP, countdown_ends=110.0), Plan(Action.NOTHING, 110.0)),
    (facts(Phase.UP, countdown_ends=100.0), Plan(Action.STOP, None)),    # linger expired
    (facts(Phase.UP, clients=1, closing=True), Plan(Action.NOTHING, None)),  # draining sessions
])
def test_decide(given, expected):
    assert decide(given, WAIT) == expected


def test_decide_never_loops_without_a_change():
    """Each action changes what the next decide() sees, so the supervisor's
    step ends: walk a tunnel's life through the plans."""
    state = facts(clients=1)
    assert decide(state, WAIT).action is Action.LAUNCH
    state = state._replace(phase=Phase.STARTING, launched_at=100.0)
    assert decide(state, WAIT).action is Action.NOTHING
    state = state._replace(phase=Phase.UP, clients=0)
    assert decide(state, WAIT).action is Action.START_COUNTDOWN
    state = state._replace(countdown_ends=100.0)
    assert decide(state, WAIT).action is Action.STOP
    state = state._replace(phase=Phase.STOPPING, countdown_ends=None)
    assert decide(state, WAIT) == Plan(Action.NOTHING, None)


def test_backoff_doubles_from_1_to_60_seconds():
    assert [minimail.backoff(n) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert [minimail.backoff(n, 0.1, 0.5) for n in range(1, 5)] == [0.1, 0.2, 0.4, 0.5]


@pytest.mark.parametrize("code, stopped, was_up, session, verdict", [
    (0, True, True, True, "STOPPED"),            # minimail stopped it, whatever it says
    (-9, True, False, True, "STOPPED"),
    (0, False, True, True, "NO_SESSION"),        # the remote command ended: use -N
    (1, False, False, True, "NO_SESSION"),
    (255, False, True, True, "DIED"),            # ssh's own error after it worked
    (255, False, False, True, "FAILED"),         # ...before it worked: a failed start
    (-9, False, True, True, "DIED"),             # killed
    (0, False, True, False, "DIED"),             # -N or a tunnel command ended
    (3, False, False, False, "FAILED"),
])
def test_judge_exit(code, stopped, was_up, session, verdict):
    assert minimail.judge_exit(code, stopped, was_up, session) is minimail.Verdict[verdict]


def test_a_suspend_is_noticed_from_the_clock_pair():
    monotonic, boot = [1000.0], [5000.0]
    watch = minimail.SleepWatch((lambda: monotonic[0], lambda: boot[0]))
    monotonic[0] += 10
    boot[0] += 10.5                                 # awake: both clocks ran (0.5 s apart)
    assert watch.slept() == 0
    monotonic[0] += 1
    boot[0] += 61                                   # asleep for 60 s: only boottime ran
    assert watch.slept() == pytest.approx(60)
    assert watch.slept() == 0                       # noticed once


# ---------------------------------------------------------------------------
# The supervisor in-process: real children, small timings
# ---------------------------------------------------------------------------

def settings_for(*argv):
    args = docopt(minimail.__doc__, ["--foreground", "--no-queue", *map(str, argv)])
    return minimail.Settings(args)


def run_supervisor(supervisor):
    greenlet = gevent.spawn(supervisor.run)
    return greenlet


def stop_supervisor(supervisor, greenlet):
    supervisor.stop_all()
    supervisor.all_gone.wait(timeout=5)
    greenlet.kill()


def test_failed_starts_back_off_with_the_supervisors_own_timings():
    port = free_port()
    settings = settings_for("--tunnel-port", port, "--tunnel-command", "sh -c 'exit 3'")
    supervisor = minimail.Supervisor(settings, lambda n: port, backoff_first=0.05,
                                     backoff_max=0.2)
    greenlet = run_supervisor(supervisor)
    supervisor.arrived()                           # a client that keeps waiting
    launched = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if supervisor.launches > len(launched):
            launched.append(time.monotonic())
        gevent.sleep(0.002)
    supervisor.left()
    stop_supervisor(supervisor, greenlet)
    gaps = [round(b - a, 2) for a, b in zip(launched, launched[1:])]
    assert len(gaps) >= 4, gaps
    for gap, delay in zip(gaps, (0.05, 0.1, 0.2, 0.2)):
        assert delay <= gap < delay + 0.1, gaps
    assert supervisor.failures == len(launched)


def test_a_stop_escalates_to_sigkill_and_never_blocks_the_supervisor(tmp_path):
    port = free_port()
    stubborn = tmp_path / "stubborn.py"
    stubborn.write_text("import signal, socket, time\n"
                        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        f"s = socket.create_server(('127.0.0.1', {port}))\n"
                        "time.sleep(60)\n")
    settings = settings_for("--tunnel-port", port, "--tunnel-command",
                            f"{sys.executable} {stubborn}", "--linger", 0, "--jitter", 0)
    supervisor = minimail.Supervisor(settings, lambda n: port, grace=0.2)
    greenlet = run_supervisor(supervisor)
    supervisor.arrived()
    upstream, child = supervisor.connect(5)
    upstream.close()
    supervisor.left()                              # linger 0: the stop begins at once
    asked = time.monotonic()
    with gevent.Timeout(0.1):                      # the supervisor answers meanwhile
        while supervisor.phase is not Phase.STOPPING:
            gevent.sleep(0.005)
    child.died.wait(timeout=5)
    assert child.returncode == -9 and 0.2 <= time.monotonic() - asked < 1.0
    stop_supervisor(supervisor, greenlet)


def test_after_a_suspend_the_held_tunnel_is_replaced(tmp_path):
    port = free_port()
    monotonic, boot = time.monotonic, [0.0]
    settings = settings_for("--tunnel-port", port, "--tunnel-command",
                            f"socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork SYSTEM:true")
    clocks = (monotonic, lambda: monotonic() + boot[0])
    supervisor = minimail.Supervisor(settings, lambda n: port, clocks=clocks, grace=0.2)
    greenlet = run_supervisor(supervisor)
    supervisor.arrived()
    upstream, first = supervisor.connect(5)
    upstream.close()
    boot[0] += 60                                   # the machine slept for a minute
    supervisor.arrived()                            # a client comes: the clocks are read
    first.died.wait(timeout=5)
    assert first.stop_reason == "resumed after 60 s asleep"
    upstream, second = supervisor.connect(5)
    upstream.close()
    assert second is not first
    supervisor.left()
    supervisor.left()
    stop_supervisor(supervisor, greenlet)


# ---------------------------------------------------------------------------
# What comes from outside
# ---------------------------------------------------------------------------

def test_printable_escapes_whatever_could_forge_a_line_or_move_a_cursor():
    assert minimail.printable(b"ok\r\nINFO\xe2\x80\xa8forged\x1b[2J\x07 end", 100) == \
        r"ok\r\nINFO\u2028forged\x1b[2J\x07 end"
    assert len(minimail.printable(b"A" * 10_000_000, 300)) == 300
    line = minimail.smtp_reply_line("421 4.4.0 " + "x" * 5000 + "\r\n")
    assert len(line) == 512 and line.endswith(b"\r\n") and line.count(b"\r") == 1


def test_the_most_telling_line_names_a_known_trouble():
    assert minimail.most_telling(["Warning: added", "me@h: Permission denied (publickey).",
                                  "usage: ssh ..."]) == "me@h: Permission denied (publickey)."
    assert minimail.most_telling(["ssh: bad thing", "usage: ssh ..."]) == "ssh: bad thing"
    assert minimail.most_telling([]) is None


@pytest.mark.parametrize("content", [
    {"started": "x", "tunnel": [1]}, {"tunnel": {"pid": float("nan")}}, {"listening": "a\x1bb"},
])
def test_a_state_file_is_checked_field_by_field(content):
    state = minimail.checked(json.loads(json.dumps(content)), minimail.STATE_SCHEMA)
    assert state["started"] is None and isinstance(state, dict)
    assert state["tunnel"] is None or state["tunnel"]["pid"] is None
    assert "\x1b" not in (state["listening"] or "")


def envelope_json(**changes):
    data = {"id": "05FF3A9C1E2B4D6A", "sender": "a@b", "recipients": ["c@d"], "arrived": 1.0,
            "size": 10, "body": None, "smtputf8": False, "bounce": False, "attempts": 0,
            "next_try": 2.0, "last_reply": None, "failures": [], "failed_at": None}
    data.update(changes)
    return json.dumps(data).encode()


def test_retries_double_to_an_hour_and_never_overflow():
    assert [minimail.retry_delay(n, 60) for n in (1, 2, 3, 7, 1100, 10**9)] == \
        [60, 120, 240, 3600, 3600, 3600]
    assert minimail.retry_delay(0, 0.5) == 0.5


@pytest.mark.parametrize("text, loopback", [("127.0.0.1", True), ("::1", True),
                                            ("::ffff:127.0.0.1", True), ("0.0.0.0", False),
                                            ("::ffff:0.0.0.0", False), ("192.0.2.1", False)])
def test_loopback_addresses_in_both_clothes(text, loopback):
    assert minimail.is_loopback(text) is loopback


def test_an_option_given_twice_is_named():
    assert minimail.explain_usage_error(["stop", "--pidfile", "a", "--pidfile", "b"], "") == \
        "--pidfile is given twice"


def test_an_envelope_from_disk_is_checked():
    assert minimail.Envelope.from_json(envelope_json(), "05FF3A9C1E2B4D6A").recipients == ["c@d"]
    for bad in (envelope_json(id="../../x"), envelope_json(recipients="c@d"),
                envelope_json(recipients=["c@d"] * 101), envelope_json(sender="a\r\nb"),
                envelope_json(size="10"), envelope_json(attempts=True), b"[1]", b"{}",
                envelope_json(next_try=float("inf")), envelope_json(arrived=float("nan")),
                envelope_json(attempts=10**400), envelope_json(size=-1)):
        with pytest.raises(ValueError):
            minimail.Envelope.from_json(bad, "05FF3A9C1E2B4D6A")
    with pytest.raises(ValueError):
        minimail.Envelope.from_json(envelope_json(), "05FF3A9C1E2B4D6B")   # not its file


# ---------------------------------------------------------------------------
# The DATA reader: ends only at CRLF.CRLF, no smuggling
# ---------------------------------------------------------------------------

def read_data(*chunks):
    reader = minimail.DataReader()
    text = b""
    for chunk in chunks:
        text += b"".join(reader.feed(chunk))
        if reader.done:
            break
    return text, reader


@pytest.mark.parametrize("payload", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n",
                                     b"\r.\n", b"\n.\r"])
def test_data_ends_only_at_crlf_dot_crlf(payload):
    smuggled = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nSubject: smuggled\r\n\r\nhi\r\n"
    text, reader = read_data(b"Subject: one\r\n\r\nfirst" + payload + smuggled, b".\r\nQUIT\r\n")
    assert reader.done and reader.leftover == b"QUIT\r\n"
    assert b"\r\n" in text and b"\n" not in text.replace(b"\r\n", b"")       # CRLF only
    assert b"\r" not in text.replace(b"\r\n", b"")
    assert smuggled in text                            # the "second message" is content


def test_data_undoes_dot_stuffing_across_chunks():
    text, reader = read_data(b"a\r\n..b\r", b"\n.", b".c\r\n.", b"\r\n")
    assert reader.done and text == b"a\r\n.b\r\n.c\r\n"


def test_a_long_line_without_crlf_is_kept_whole_but_never_ends_the_data():
    long_line = b"." + b"x" * 200_000
    text, reader = read_data(long_line[:100_000], long_line[100_000:] + b"\r\n.\r\n")
    assert reader.done and text == b"x" * 200_000 + b"\r\n"      # unstuffed once, at the start


def test_the_end_marker_split_across_chunks():
    text, reader = read_data(b"a\r", b"\n", b".", b"\r", b"\nNOOP\r\n")
    assert reader.done and text == b"a\r\n" and reader.leftover == b"NOOP\r\n"
    text, reader = read_data(b".\r\n")
    assert reader.done and text == b""                 # an empty message


def reference_data(raw):
    """The DATA rules line by line, as RFC 5321 puts them: (text, leftover) or
    None if the end never comes."""
    lines, text = raw.split(b"\r\n"), []
    for i, line in enumerate(lines[:-1]):
        if line == b".":
            return b"".join(text), b"\r\n".join(lines[i + 1:])
        line = line[1:] if line.startswith(b".") else line
        text.append(re.sub(rb"\r\n|\r|\n", b"\r\n", line) + b"\r\n")
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\r\n.\r\n", b"x" * 7]),
                max_size=40), st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_the_data_reader_keeps_the_rules_whatever_the_chunks(pieces, cuts):
    raw = b"".join(pieces) + b"\r\n.\r\nNOOP\r\n"
    chunks, offset = [], 0
    for cut in cuts * 20:
        if offset >= len(raw):
            break
        chunks.append(raw[offset:offset + cut])
        offset += cut
    chunks.append(raw[offset:])
    text, reader = read_data(*chunks)
    assert reader.done
    assert (text, reader.leftover + b"".join(chunks[len(read_chunks(chunks, reader)):])) == \
        reference_data(raw)


def read_chunks(chunks, reader):
    """The chunks a finished reader took (it stops at the one with the end)."""
    replay = minimail.DataReader()
    for i, chunk in enumerate(chunks):
        replay.feed(chunk)
        if replay.done:
            return chunks[:i + 1]
    return chunks


@pytest.mark.parametrize("argument, expected", [
    ("FROM:<a@b>", ("a@b", [])), ("from: <>", ("", [])),
    ("FROM:<a@b> SIZE=10 BODY=8BITMIME SMTPUTF8", ("a@b", [("SIZE", "10"), ("BODY", "8BITMIME"),
                                                           ("SMTPUTF8", None)])),
    ("FROM:a@b", None), ("TO:<a@b>", None), ("FROM:<a<b>", None),
])
def test_parse_path(argument, expected):
    assert minimail.parse_path("FROM", argument) == expected


# ---------------------------------------------------------------------------
# The sendmail command's parsing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expected, recipients", [
    (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
     dict(full_name="CronDaemon", dot_ends=False, body="8BITMIME"), ["root"]),
    (["-i", "-t"], dict(dot_ends=False, recipients_from_header=True), []),
    (["-oi", "-f", "me@x", "a@b", "c@d"], dict(dot_ends=False, sender="me@x"), ["a@b", "c@d"]),
    (["-fme@x", "-r", "<>", "a@b"], dict(sender=""), ["a@b"]),
    (["-F", "Cron Daemon", "-B", "7bit", "--", "-weird@x"], dict(full_name="Cron Daemon", body="7BIT"),
     ["-weird@x"]),
    (["-bp"], dict(mode="p"), []), (["-bs"], dict(mode="s"), []), (["-q"], dict(mode="q"), []),
    (["-q30m"], dict(mode="q"), []), (["-ti", "-v", "a@b"], dict(recipients_from_header=True,
                                                               dot_ends=False, verbose=True), ["a@b"]),
    (["-odi", "-oep", "-L", "tag", "-N", "never", "-R", "hdrs", "-V", "id", "-X", "log", "-h",
      "10", "-C", "cf", "a@b"], dict(), ["a@b"]),
])
def test_sendmail_flags(argv, expected, recipients):
    flags, found = minimail.parse_sendmail_flags(argv)
    defaults = dict(recipients_from_header=False, dot_ends=True, sender=None, full_name=None,
                    body=None, mode="m", verbose=False)
    assert flags._asdict() == {**defaults, **expected} and found == recipients


@pytest.mark.parametrize("argv, complaint", [
    (["-Y", "a@b"], "unknown flag -Y"), (["-f"], "-f needs a value"),
    (["-B", "9BIT"], "the body type is 8BITMIME or 7BIT"), (["-bd"], "-bd is not supported"),
])
def test_bad_sendmail_flags_are_usage_errors(argv, complaint):
    with pytest.raises(minimail.SendmailExit) as failure:
        minimail.parse_sendmail_flags(argv)
    assert failure.value.status == 64 and complaint in str(failure.value)


def test_the_header_is_split_from_the_body_and_bcc_goes():
    text = (b"From root\r\nTo: a@x, B <b@x>\r\nCc: c@x\r\nBcc: d@x,\r\n e@x\r\nSubject: hi\r\n\r\n"
            b"Bcc: not a header\r\n")
    header, body = minimail.split_header(text)
    assert header[0] == b"To: a@x, B <b@x>" and body == b"Bcc: not a header\r\n"
    found, kept = minimail.header_recipients(header)
    assert found == ["a@x", "b@x", "c@x", "d@x", "e@x"]
    assert kept == [b"To: a@x, B <b@x>", b"Cc: c@x", b"Subject: hi"]
    resent = [b"To: a@x", b"Resent-To: r@x", b"Resent-Bcc: s@x"]
    assert minimail.header_recipients(resent) == (["r@x", "s@x"], [b"To: a@x", b"Resent-To: r@x"])
    assert minimail.split_header(b"no header here\r\n") == ([], b"no header here\r\n")


def test_a_local_submission_gets_date_message_id_and_from():
    header = minimail.completed_header([b"Subject: x"], "me@host.example", "Cron Daemon",
                                       "host.example")
    names = [line.split(b":")[0] for line in header]
    assert names == [b"Subject", b"Date", b"Message-ID", b"From"]
    assert header[-1] == b"From: Cron Daemon <me@host.example>"
    assert header[2].endswith(b"@host.example>")
    kept = [b"From: root (Cron Daemon)", b"Date: x", b"Message-ID: <y>"]
    assert minimail.completed_header(kept, "a@b", None, "h") == kept


def test_local_names_go_to_the_admin_address():
    with_admin = minimail.SettingsFile(values={"MINIMAIL_ADMIN": "admin@x"})
    assert minimail.deliverable(["root", "a@b", "cron", "admin@x"], with_admin) == ["admin@x", "a@b"]
    with pytest.raises(minimail.SendmailExit) as failure:
        minimail.deliverable(["root"], minimail.SettingsFile(path="/etc/default/minimail"))
    assert failure.value.status == 67
    assert "set MINIMAIL_ADMIN=you@example.org in /etc/default/minimail" in str(failure.value)


def test_the_settings_file_and_the_command_line_merge(tmp_path):
    path = tmp_path / "minimail.conf"
    path.write_text("# minimail\nMINIMAIL_DESTINATION=me@hoster\n"
                    "MINIMAIL_OPTIONS=\"--listen 127.0.0.1:2525 --linger 30 -o 'ConnectTimeout 10'\"\n"
                    "MINIMAIL_SENDER=me@example.org\nexport MINIMAIL_ADMIN='admin@example.org'\n")
    settings_file = minimail.SettingsFile.read(path)
    assert settings_file.listen()[1:] == ("127.0.0.1", 2525)
    assert (settings_file.sender, settings_file.admin) == ("me@example.org", "admin@example.org")
    merged = minimail.merge_settings_file(["--foreground", "--linger", "5", "-o", "A=1"],
                                          settings_file)
    args = docopt(minimail.__doc__, merged)
    assert (args["DESTINATION"], args["--linger"], args["--listen"]) == ("me@hoster", "5",
                                                                         "127.0.0.1:2525")
    assert args["-o"] == ["ConnectTimeout 10", "A=1"]
    assert minimail.merge_settings_file(["--foreground", "other@host"], settings_file) == \
        ["--foreground", "other@host"]                # a DESTINATION given: the file stays out
    path.write_text("MINIMAIL_DESTNATION=typo\n")
    with pytest.raises(minimail.UsageError, match="unknown setting MINIMAIL_DESTNATION"):
        minimail.SettingsFile.read(path)


def test_the_sendmail_path_loads_no_gevent_and_no_docopt():
    code = ("import sys, minimail; minimail.parse_sendmail_flags(['-t']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'docopt')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                          text=True, timeout=30,
                                          cwd=os.path.dirname(minimail.__file__))
    assert result.stdout.strip() == "[]", result.stderr
