"""A second read of the local-mail parts where their pieces meet: the sendmail
command's transactions and the maildrop, the daemon's intake.

Built on test_maildrop's machine (a settings file, a queue the real daemon
made, the `sendmail` symlink) and its stand-in minimail on loopback.
"""

import os
import subprocess
import time

import pytest

import minimail
from conftest import free_port, minimail_command
from test_maildrop import CONSOLE_SCRIPT, Machine, StandIn, root_only


@pytest.fixture
def machine(run_dir, hoster):
    made = Machine(run_dir, hoster)
    yield made
    if made.pidfile.exists():                          # a test failed with its daemon running
        minimail_command("stop", "--pidfile", made.pidfile)


class TakesSomeThenGoes(StandIn):
    """A minimail that takes 100 recipients a transaction (452 for more), refuses
    one of them for good, and goes away in the second transaction's DATA."""

    def __init__(self, refused):
        self.refused, self.transactions = refused.encode(), 0
        super().__init__()

    def session(self, conn, lines):
        conn.sendall(b"220 stand-in ESMTP\r\n")
        taken = 0
        for line in iter(lambda: lines.readline(1024), b""):
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-stand-in\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                taken = 0
                conn.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT" and self.refused in line:
                conn.sendall(b"550 5.1.1 no such user\r\n")
            elif verb == b"RCPT":
                taken += 1
                conn.sendall(b"250 2.1.5 ok\r\n" if taken <= 100 else
                             b"452 4.5.3 too many recipients\r\n")
            elif verb == b"DATA":
                self.transactions += 1
                conn.sendall(b"354 go on\r\n")
                if self.transactions > 1:
                    lines.read(100)
                    return                                  # gone before its reply
                self.sink(lines)
                conn.sendall(b"250 2.0.0 taken\r\n")
            else:
                conn.sendall(b"250 ok\r\n")


@pytest.fixture
def takes_some_then_goes():
    made = TakesSomeThenGoes("refused@hoster.example")
    yield made
    made.close()


@root_only
def test_a_recipient_refused_before_minimail_went_away_is_not_passed_over(
        machine, takes_some_then_goes):
    machine.ran_once()
    machine.configure(listen=takes_some_then_goes.port)
    recipients = ["refused@hoster.example"] + [f"u{i}@hoster.example" for i in range(150)]
    result = machine.sendmail("-i", *recipients, message="Subject: many\n\nto many\n")
    said = result.stderr.decode().splitlines()
    assert said[0].startswith("minimail: minimail went away ("), said
    assert said[1:] == ["minimail: 1 of 151 recipients were not accepted, "
                        "<refused@hoster.example> with: 550 5.1.1 no such user"]
    assert result.returncode == 67
    dropped, = machine.dropped()                  # the 50 the first transaction left
    envelope = (machine.maildrop / dropped).read_bytes().split(b"\r\n", 1)[0]
    assert envelope.count(b"@hoster.example") == 50 and b"refused@" not in envelope


@pytest.mark.parametrize("options, complaint", [("--bogus 1", "unknown option --bogus"),
                                                 ("--listen 2525 --queue", "--queue needs a value")])
@pytest.mark.parametrize("name, flags", [("sendmail", ["-bp"]), ("sendmail", ["-q"]),
                                         ("mailq", []), ("sendmail", ["-i", "root"])])
def test_an_unknown_option_in_the_settings_file_is_a_settings_error_for_every_mode(
        tmp_path, name, flags, options, complaint):
    config = tmp_path / "minimail.conf"
    config.write_text(f"MINIMAIL_OPTIONS={options}\nMINIMAIL_SENDER=me@desktop.example\n"
                      "MINIMAIL_ADMIN=admin@hoster.example\n")
    (tmp_path / name).symlink_to(CONSOLE_SCRIPT)
    env = {**os.environ, "MINIMAIL_CONFIG": str(config), "MINIMAIL_ALIASES": "/dev/null"}
    result = subprocess.run([str(tmp_path / name), *flags], input=b"Subject: x\n\nhi\n",
                            capture_output=True, env=env, timeout=30)
    assert result.stderr.decode().splitlines() == [
        f"minimail: {config}: MINIMAIL_OPTIONS: {complaint}"]
    assert result.returncode == 78


@root_only
def test_more_recipients_than_a_maildrop_file_may_name_are_kept_in_files_the_daemon_takes(
        machine):
    machine.ran_once()
    machine.configure(listen=free_port())                   # minimail is down
    recipients = [f"u{i}@hoster.example" for i in range(minimail.MAILDROP_RECIPIENTS_MAX + 1)]
    result = machine.sendmail("-i", *recipients, message="Subject: many\n\nto many\n")
    assert result.returncode == 0, result.stderr
    named = []
    for name in machine.dropped():
        with open(machine.maildrop / name, "rb") as dropped:
            envelope = minimail.read_maildrop_envelope(dropped, os.fstat(dropped.fileno()),
                                                       minimail.MAX_SIZE_DEFAULT)
        named += envelope[1]
    assert sorted(named) == sorted(recipients)


def test_a_mail_name_file_with_a_stray_character_is_refused_at_once(tmp_path):
    mailname = tmp_path / "mailname"
    mailname.write_text("backup-server.internal.example.org/\n")   # tried every split: minutes
    listening = StandIn()
    try:
        config = tmp_path / "minimail.conf"
        config.write_text(f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{listening.port} --no-queue\n"
                          "MINIMAIL_SENDER=me@desktop.example\n")
        env = {**os.environ, "MINIMAIL_CONFIG": str(config), "MINIMAIL_MAILNAME": str(mailname)}
        started = time.monotonic()
        result = subprocess.run([str(CONSOLE_SCRIPT), "sendmail", "-i", "you@hoster.example"],
                                input=b"Subject: x\n\nhi\n", capture_output=True, env=env,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 10
    finally:
        listening.close()
    assert minimail.read_mailname(str(mailname)) == ""


def test_a_sender_domain_ehlo_cannot_say_is_not_the_mail_name(tmp_path):
    """(Where this machine's FQDN is dotted, that is the mail name, and this
    test shows nothing; on one without, EHLO said bücher.example and failed.)"""
    assert minimail.choose_mail_name("", lambda: "vm", "me@bücher.example") is None
    assert minimail.choose_mail_name("", lambda: "vm", "me@bücher.example",
                                     "admin@hoster.example") == "hoster.example"
    mailname = tmp_path / "mailname"
    mailname.write_text("")
    listening = StandIn()
    try:
        config = tmp_path / "minimail.conf"
        config.write_text(f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{listening.port} --no-queue\n"
                          "MINIMAIL_SENDER=me@bücher.example\n")
        env = {**os.environ, "MINIMAIL_CONFIG": str(config), "MINIMAIL_MAILNAME": str(mailname)}
        result = subprocess.run([str(CONSOLE_SCRIPT), "sendmail", "-i", "-f", "me@example.org",
                                 "you@hoster.example"], input=b"Subject: x\n\nhi\n",
                                capture_output=True, env=env, timeout=30)
    finally:
        listening.close()
    assert result.returncode == 0, result.stderr
