"""The sendmail command: cron, mail(1) and scripts hand their mail to
`/usr/sbin/sendmail`, here a symlink to minimail's own console script, which
submits it to a running minimail (in front of a real sshd and hoster).

The settings both read (where minimail listens, the sender, the admin
address) come from a settings file named by MINIMAIL_CONFIG, as a user's
~/.config/minimail/minimail.conf or /etc/default/minimail would hold them.
"""

import email
import os
import re
import shutil
import subprocess
import sys
from email import policy
from pathlib import Path

import pytest

from conftest import (
    AS_ROOT, CRON_MAIL, console_script, free_port, make_message, minimail_command, minimail_via,
    need, wait_until)

CONSOLE_SCRIPT = console_script()
SENDER, ADMIN = "me@desktop.example", "admin@hoster.example"


@pytest.fixture
def sendmail(tmp_path):
    """A function that runs the `sendmail` symlink with settings for a minimail
    on `port`: sendmail(port, *flags, message=..., settings=...) -> CompletedProcess."""
    need("minimail's console script (pip install -e .)", str(CONSOLE_SCRIPT))
    link = tmp_path / "bin" / "sendmail"
    link.parent.mkdir()
    link.symlink_to(CONSOLE_SCRIPT)
    config = tmp_path / "minimail.conf"

    def run(port, *flags, message=CRON_MAIL, settings=None, name="sendmail"):
        settings = settings if settings is not None else (
            f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{port}\n"
            f"MINIMAIL_SENDER={SENDER}\nMINIMAIL_ADMIN={ADMIN}\n")
        if "MINIMAIL_ALIASES" not in settings:     # never the machine's own /etc/aliases
            settings += "MINIMAIL_ALIASES=/dev/null\n"
        config.write_text(settings)
        program = link.with_name(name)
        if not program.exists():
            program.symlink_to(CONSOLE_SCRIPT)
        env = {**os.environ, "MINIMAIL_CONFIG": str(config)}
        return subprocess.run([str(program), *map(str, flags)], input=message.encode()
                              if isinstance(message, str) else message, capture_output=True,
                              env=env, timeout=60)
    run.link, run.config = link, config
    return run


def parsed(delivered):
    return email.message_from_bytes(delivered.content, policy=policy.default)


def test_crons_exact_command_line_reaches_the_admin(through_ssh, hoster, sendmail):
    mm = through_ssh()
    result = sendmail(mm.port, "-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root")
    assert (result.returncode, result.stderr) == (0, b"")
    message, = hoster.messages
    assert message.rcpt_tos == [ADMIN] and message.mail_from == SENDER
    header, body = message.content.split(b"\r\n\r\n", 1)
    assert header.startswith(b"From: Cron Daemon <me@desktop.example>\r\n"   # masqueraded
                             b"To: admin@hoster.example\r\n")              # where it went
    assert re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n", header)
    assert re.search(rb"\r\nMessage-ID: <[\w.]+@\S+>(\r\n|$)", header)
    assert body == "backup: 3 files copied, Größe 12 kB\r\n.\r\nthe line above has a lone dot, " \
                   "which -i keeps\r\n".encode()
    assert "admin@hoster.example" not in mm.log()


def test_mail_1_sends_through_the_sendmail_symlink(through_ssh, hoster, sendmail, tmp_path):
    mail = shutil.which("mail") or shutil.which("bsd-mailx")
    need("bsd-mailx", mail)
    mm = through_ssh()
    sendmail(mm.port, "-bi", message="")                   # writes the settings file
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={sendmail.link}\n")
    env = {**os.environ, "MAILRC": str(mailrc), "MINIMAIL_CONFIG": str(sendmail.config)}
    result = subprocess.run([mail, "-s", "hi from mail(1)", "friend@hoster.example"],
                            input=b"It works.\n", capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: hoster.messages, 10, "the mail")
    message, = hoster.messages
    assert message.rcpt_tos == ["friend@hoster.example"] and message.mail_from == SENDER
    assert parsed(message)["Subject"] == "hi from mail(1)"
    assert message.content.endswith(b"\r\n\r\nIt works.\r\n")


def test_recipients_from_the_header_and_no_bcc_on_the_way(through_ssh, hoster, sendmail):
    mm = through_ssh()
    text = ("To: One <one@hoster.example>, two@hoster.example\nCc: three@hoster.example\n"
            "Bcc: hidden@hoster.example\nSubject: -t\n\nbody\n.\nafter a lone dot\n")
    result = sendmail(mm.port, "-t", "-f", "sender@desktop.example", "-F", "Full Name",
                      "extra@hoster.example", message=text)
    assert result.returncode == 0, result.stderr
    message, = hoster.messages
    assert sorted(message.rcpt_tos) == sorted(["one@hoster.example", "two@hoster.example",
                                               "three@hoster.example", "hidden@hoster.example",
                                               "extra@hoster.example"])
    assert message.mail_from == "sender@desktop.example"
    assert b"hidden" not in message.content and b"Bcc" not in message.content
    assert parsed(message)["From"] == "Full Name <sender@desktop.example>"
    assert message.content.endswith(b"\r\n\r\nbody\r\n")   # without -i, the lone dot ends it


def test_smtp_on_standard_input_and_output(through_ssh, hoster, sendmail):
    mm = through_ssh()
    dialogue = ("EHLO desktop.example\r\nMAIL FROM:<me@desktop.example>\r\n"
                "RCPT TO:<admin@hoster.example>\r\nDATA\r\n")
    body = "Subject: -bs\r\n\r\nspoken on stdin\r\n.\r\nQUIT\r\n"
    result = sendmail(mm.port, "-bs", message=dialogue + body)
    assert result.returncode == 0, result.stderr
    replies = result.stdout.decode()
    assert replies.startswith("220 ") and "\r\n250 " in replies and "354 " in replies
    assert "\r\n221 " in replies
    message, = hoster.messages
    assert message.content.endswith(b"\r\n\r\nspoken on stdin\r\n")


def test_without_a_daemon_it_exits_75_in_one_line(sendmail):
    port = free_port()
    result = sendmail(port, "-i", "root")
    assert result.returncode == 75
    assert result.stderr.decode().splitlines() == [
        f"minimail: cannot reach minimail at 127.0.0.1:{port}: ECONNREFUSED (is it running? "
        f"minimail status)"]


def test_with_the_hoster_away_the_mail_waits_in_the_queue(own_sshd, hoster, minimail_process,
                                                           sendmail):
    own_sshd.stop()
    try:
        mm = minimail_via(own_sshd, hoster, minimail_process, 30)("--queue-retry", 0.5)
        settings = (f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{mm.port} --queue {mm.queue}\n"
                    f"MINIMAIL_SENDER={SENDER}\nMINIMAIL_ADMIN={ADMIN}\n")
        result = sendmail(mm.port, "-i", "root", settings=settings)
        assert (result.returncode, result.stderr) == (0, b"")    # queued counts as accepted
        assert hoster.messages == []
        listing = sendmail(mm.port, name="mailq", message="", settings=settings)
        assert listing.returncode == 0                          # invoked as mailq: the queue
        assert re.search(rf"^queue in {mm.queue}: 1 message\(s\) waiting, 0 failed\n"
                         rf"[0-9A-F]{{16}}  \d+ s old  \d+ bytes  from <{SENDER}>  to 1: <{ADMIN}>",
                         listing.stdout.decode())
    finally:
        own_sshd.start()
    wait_until(lambda: hoster.messages, 15, "the queue to deliver it")
    assert hoster.messages[0].rcpt_tos == [ADMIN]


def test_a_refused_recipient_exits_67_quoting_the_reply(through_ssh, hoster, sendmail):
    hoster.refuse = {ADMIN: "550 5.1.1 no such user here"}
    mm = through_ssh()
    result = sendmail(mm.port, "-i", "root")
    assert result.returncode == 67
    assert result.stderr.decode().splitlines() == [
        "minimail: every recipient was refused: 550 5.1.1 no such user here"]
    hoster.refuse = {ADMIN: "451 4.3.0 try again later"}
    assert sendmail(mm.port, "-i", "root").returncode == 75


@pytest.mark.parametrize("flags, status, line", [
    (["-Y", "root"], 64, "minimail: unknown flag -Y (see `minimail --help`, The sendmail command)"),
    (["-i"], 64, "minimail: no recipients given (name them, or use -t)"),
    (["-t"], 65, "minimail: -t: no recipients in To, Cc or Bcc (is the message's header there?)"),
])
def test_bad_invocations_exit_by_sysexits_in_one_line(sendmail, flags, status, line):
    result = sendmail(1, *flags, message="Subject: x\n\nno header recipients\n")
    assert (result.returncode, result.stderr.decode().splitlines()) == (status, [line])


@pytest.mark.parametrize("flags, line", [
    (["-F", "Evil\nX-Injected: yes", "a@b.example"],
     "minimail: -F: the name may hold no line breaks or control characters"),
    (["-i", "bob@example.net>\r\nRCPT TO:<extra@example.net"],
     "minimail: 'bob@example.net>\\r\\nRCPT TO:<extra@example.net' is not an address (no line "
     "breaks, control characters or <>)"),
    (["-f", "me@x\r\nRCPT TO:<y@z>", "a@b.example"],
     "minimail: 'me@x\\r\\nRCPT TO:<y@z' is not an address (no line breaks, control "
     "characters or <>)"),
])
def test_line_breaks_in_names_and_addresses_inject_nothing(sendmail, flags, line):
    result = sendmail(1, *flags, message="Subject: x\n\nbody\n")
    assert (result.returncode, result.stderr.decode().splitlines()) == (64, [line])


def test_a_local_name_without_an_admin_address_says_how_to_set_one(sendmail):
    result = sendmail(1, "-i", "root", settings="MINIMAIL_OPTIONS=--listen 127.0.0.1:1\n")
    assert result.returncode == 67
    assert result.stderr.decode() == (
        f"minimail: 'root' is a local name, and no admin address is set to send it to: set "
        f"MINIMAIL_ADMIN=you@example.org in {sendmail.config}\n")


def test_minimail_sendmail_is_the_same_command(through_ssh, hoster, sendmail):
    mm = through_ssh()
    sendmail(mm.port, "-bi", message="")                   # writes the settings file
    env = {**os.environ, "MINIMAIL_CONFIG": str(sendmail.config)}
    result = subprocess.run([sys.executable, Path(__file__).parent / "minimail.py", "sendmail",
                             "-i", "root"], input=make_message("subcommand"),
                            capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert hoster.messages[0].content.startswith(make_message("subcommand").split(b"\r\n\r\n")[0])


def test_the_daemon_takes_its_settings_from_the_same_file(sshd, hoster, sendmail, tmp_path,
                                                          minimail_process):
    port = free_port()
    settings = (f"MINIMAIL_DESTINATION=hoster\nMINIMAIL_OPTIONS=\"--listen 127.0.0.1:{port} "
                f"--ssh '{sshd.ssh}' --remote 127.0.0.1:{hoster.port} --queue {tmp_path}/q\"\n"
                f"MINIMAIL_SENDER={SENDER}\nMINIMAIL_ADMIN={ADMIN}\n")
    sendmail.config.write_text(settings)
    log = tmp_path / "daemon.log"
    env = {**os.environ, "MINIMAIL_CONFIG": str(sendmail.config)}
    with open(log, "wb") as stderr:
        daemon = subprocess.Popen([sys.executable, Path(__file__).parent / "minimail.py",
                                   "--foreground", *AS_ROOT], stderr=stderr, env=env)
    try:
        wait_until(lambda: b"listening on" in log.read_bytes() or daemon.poll() is not None, 10,
                   "the daemon")
        assert f"listening on 127.0.0.1:{port}; tunnel: ssh hoster".encode() in log.read_bytes()
        result = sendmail(port, "-i", "root", settings=settings)
        assert result.returncode == 0, result.stderr
        assert hoster.messages[0].rcpt_tos == [ADMIN]
        checked = minimail_command("check", *AS_ROOT, env=env)
        assert checked.returncode == 0, checked.stdout
        assert f"sendmail settings: {sendmail.config}" in checked.stdout
        assert f"submits to minimail at 127.0.0.1:{port}" in checked.stdout
        assert f"admin (for mail to root and other local names): {ADMIN}" in checked.stdout
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=15) == 0

