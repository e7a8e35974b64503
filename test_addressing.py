"""minimail as the machine's MTA addresses local mail right: what cron, GNU
mailutils, mutt, bsd-mailx, unattended-upgrades and git send-email hand to
`sendmail` (a symlink to minimail's console script) reaches a strict hoster
(one that refuses unqualified senders and recipients, as Postfix with
reject_non_fqdn_sender and reject_non_fqdn_recipient does) fully qualified:
local names through the aliases file, local senders masqueraded in the
envelope and the header, Message-IDs at the mail name.  Also newaliases and
-bi, the double bounce, mailq for other users, `check`, and the pure parts
(alias parsing, the local-address test, header rewriting, settings values).

Every test names an aliases file of its own (MINIMAIL_ALIASES) and a mail
name file of its own (MINIMAIL_MAILNAME): nothing here depends on this
machine's /etc/aliases, /etc/mailname or host name.
"""

import email
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from email import policy
from email.utils import getaddresses
from pathlib import Path

import pytest

import minimail
from conftest import (AS_ROOT, Hoster, free_port, make_message, minimail_command, minimail_via,
                      need, ssh_config_with_key, wait_until)

CONSOLE_SCRIPT = Path(sys.executable).parent / "minimail"
SENDER, ADMIN = "me@example.org", "admin@example.org"
#: The mail name the tests give this machine (through $MINIMAIL_MAILNAME).
MAIL_NAME = "desktop.example.net"
HOST = socket.gethostname()
#: Names of this machine no address may be at when it reaches the hoster.
MACHINE_NAMES = {"localhost", "localhost.localdomain", HOST.lower(), socket.getfqdn().lower(),
                 MAIL_NAME}
#: Where the command of an alias would leave its mark, if it were ever run.
COMMAND_MARK = "/tmp/minimail-test-alias-command-ran"

ALIASES = f"""\
# aliases(5), as the tests' machine has them
postmaster: root
root:       ops
# a list, continued on the next line
ops:        ops@example.org,
            oncall@example.net
www-data:   "|/bin/touch {COMMAND_MARK}", root
Loop1:      loop2
loop2:      loop1
"""
#: Where mail to root goes, by the aliases above (root -> ops -> two addresses).
ROOTS = ["ops@example.org", "oncall@example.net"]


# ---------------------------------------------------------------------------
# The hoster: strict about unqualified addresses, as Postfix can be
# ---------------------------------------------------------------------------

def unqualified(address, what):
    """Postfix's reply to an address it would not take, or None."""
    if address in ("", "<>"):                     # the null sender (of bounces)
        return None
    if "@" not in address:
        return f"553 5.1.3 <{address}>: {what} address rejected: need fully-qualified address"
    if "." not in address.rpartition("@")[2]:
        return f"504 5.5.2 <{address}>: {what} address rejected: need fully-qualified address"
    return None


class StrictHoster(Hoster):
    """Refuses what a strict Postfix refuses: unqualified senders and
    recipients, and a client whose EHLO name is not fully qualified."""

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        refused = unqualified(address, "Sender")
        if refused:
            return refused
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        return bare_helo(session.host_name) or unqualified(address, "Recipient") or \
            await super().handle_RCPT(server, session, envelope, address, rcpt_options)


def bare_helo(name):
    """Postfix's reject_non_fqdn_helo_hostname: the EHLO name must be dotted."""
    if "." not in (name or "").strip("[]"):
        return f"504 5.5.2 <{name}>: Helo command rejected: need fully-qualified hostname"
    return None


@pytest.fixture
def hoster():
    """This module's hoster is the strict one (through_ssh delivers to it)."""
    server = StrictHoster()
    yield server
    server.controller.stop()


@pytest.fixture
def local(tmp_path, monkeypatch):
    """This machine as the tests see it: a mail name file, an aliases file, a
    settings file; minimail daemons started from now on get the mail name too."""
    mailname = tmp_path / "mailname"
    mailname.write_text(MAIL_NAME + "\n")
    monkeypatch.setenv("MINIMAIL_MAILNAME", str(mailname))
    aliases = tmp_path / "aliases"
    aliases.write_text(ALIASES)
    settings = tmp_path / "minimail.conf"
    if os.path.exists(COMMAND_MARK):
        os.unlink(COMMAND_MARK)
    return type("Local", (), {"mailname": mailname, "aliases": aliases, "settings": settings})


@pytest.fixture
def sendmail(tmp_path, local):
    """sendmail(port, *flags, message=..., name="sendmail") runs the symlink
    with settings for a minimail on port: a CompletedProcess."""
    need("minimail's console script (pip install -e .)", str(CONSOLE_SCRIPT))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def run(port, *flags, message="", name="sendmail", settings=None):
        local.settings.write_text(settings or (
            f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{port}   # where minimail listens\n"
            f"MINIMAIL_SENDER={SENDER}   # the envelope sender of local mail\n"
            f"MINIMAIL_ADMIN=\"{ADMIN}\"\nMINIMAIL_ALIASES={local.aliases}\n"))
        program = bin_dir / name
        if not program.exists():
            program.symlink_to(CONSOLE_SCRIPT)
        env = {**os.environ, "MINIMAIL_CONFIG": str(local.settings)}
        return subprocess.run([str(program), *flags], input=message.encode(),
                              capture_output=True, env=env, timeout=60)
    return run


def header_addresses(message):
    """{field: [address]} of the address fields of a delivered message."""
    parsed = email.message_from_bytes(message.content, policy=policy.compat32)
    return {field: [a for _, a in getaddresses(parsed.get_all(field, []))]
            for field in ("From", "To", "Cc", "Sender", "Reply-To") if field in parsed}


def assert_fully_qualified(address):
    local_part, at, domain = address.rpartition("@")
    assert at and local_part and "." in domain, f"{address!r} is not fully qualified"
    assert domain.lower() not in MACHINE_NAMES, f"{address!r} is at a name of this machine"


def show(client, flags, message):
    """The envelope and header lines that arrived (pytest -s prints them)."""
    header = message.content.split(b"\r\n\r\n")[0].decode("utf-8", "replace")
    wanted = re.findall(r"^(?:From|To|Cc|Sender|Reply-To|Message-ID|Message-Id|Subject):.*"
                        r"(?:\r\n[ \t].*)*", header, re.M | re.I)
    print(f"\n--- {client}: sendmail {' '.join(flags)}\nMAIL FROM:<{message.mail_from}>")
    print("\n".join(f"RCPT TO:<{r}>" for r in message.rcpt_tos))
    print("\n".join(line.replace("\r\n", "\n") for line in wanted))


# ---------------------------------------------------------------------------
# What each client hands to sendmail, as it does it
# ---------------------------------------------------------------------------

#: Debian's cron: `sendmail -FCronDaemon -i -B8BITMIME -oem MAILTO` (no Date,
#: no Message-ID; LF line ends; cron's own Subject names root@HOST).
CRON = f"""\
From: root (Cron Daemon)
To: {{mailto}}
Subject: Cron <root@{HOST}> /usr/local/bin/backup
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: 8bit
X-Cron-Env: <SHELL=/bin/sh>
X-Cron-Env: <HOME=/root>
X-Cron-Env: <LOGNAME=root>

backup: 3 files copied
"""

#: GNU mailutils' mail(1): `sendmail -oi -f root@HOST -t`.
MAILUTILS = f"""\
To: friend@example.net
Cc: root
Subject: disk space on {HOST}
X-Mailer: mail (GNU Mailutils 3.15)

/ is 91% full
"""

#: mutt: `sendmail -oem -oi -- RCPT...` (its From names the local user at
#: the host name; its own Message-ID).
MUTT = f"""\
Date: Sun, 6 Dec 2026 01:40:00 +0000
From: root <root@{HOST}>
To: friend@example.net
Cc: postmaster@localhost
Subject: backup report
Message-ID: <20261206014000.GA4711@{MAIL_NAME}>
MIME-Version: 1.0
Content-Type: text/plain; charset=us-ascii
Content-Disposition: inline
User-Agent: Mutt/2.2.9 (2022-11-12)

All good.
"""

#: bsd-mailx (`mail -s hello friend@example.net,root` as it runs here): `sendmail -i -t`.
MAILX_T = """\
To: friend@example.net,root
Subject: hello
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"
Content-Transfer-Encoding: 8bit

body
"""

#: bsd-mailx when told the recipients: `sendmail -i RCPT`.
MAILX = """\
To: www-data
Subject: hello
MIME-Version: 1.0
Content-Type: text/plain; charset="UTF-8"
Content-Transfer-Encoding: 8bit

body
"""

#: unattended-upgrades (Python's email, Unattended-Upgrade::Mail "root"): `sendmail -oi -t`.
UNATTENDED = f"""\
Subject: unattended-upgrades result for {HOST}: SUCCESS
From: root
To: root
Auto-Submitted: auto-generated
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: 8bit

Unattended upgrade result: All upgrades installed
"""

#: git send-email with sendemail.sendmailcmd: `sendmail -i -f FROM RCPT...`.
GIT_SEND_EMAIL = """\
From: Dev Eloper <dev@example.org>
To: list@example.net
Cc: reviewer@example.net
Subject: [PATCH] minimail: aliases
Date: Sun,  6 Dec 2026 01:40:00 +0000
Message-ID: <20261206014000.4711-1-dev@example.org>
X-Mailer: git-send-email 2.39.5
MIME-Version: 1.0
Content-Transfer-Encoding: 8bit

---
 minimail.py | 2 +-
"""

#: (client, flags, message, envelope sender, recipients, From as it arrives, To as it arrives)
CLIENTS = [
    ("cron", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"], CRON.format(mailto="root"),
     SENDER, ROOTS, "Cron Daemon <me@example.org>", ", ".join(ROOTS)),
    ("cron, MAILTO=root@localhost", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem",
                                     "root@localhost"], CRON.format(mailto="root@localhost"),
     SENDER, ROOTS, "Cron Daemon <me@example.org>", ", ".join(ROOTS)),
    ("cron, MAILTO=alice", ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "alice"],
     CRON.format(mailto="alice"), SENDER, [ADMIN], "Cron Daemon <me@example.org>", ADMIN),
    ("GNU mailutils", ["-oi", "-f", f"root@{HOST}", "-t"], MAILUTILS,
     SENDER, ["friend@example.net", *ROOTS], "me@example.org", "friend@example.net"),
    ("mutt", ["-oem", "-oi", "--", "friend@example.net", "postmaster@localhost"], MUTT,
     SENDER, ["friend@example.net", *ROOTS], "root <me@example.org>", "friend@example.net"),
    ("bsd-mailx -t", ["-i", "-t"], MAILX_T,
     SENDER, ["friend@example.net", *ROOTS], "me@example.org", f"friend@example.net, {ROOTS[0]},"
                                                               f" {ROOTS[1]}"),
    ("bsd-mailx", ["-i", "www-data"], MAILX,
     SENDER, [ADMIN, *ROOTS], "me@example.org", f"{ADMIN}, {', '.join(ROOTS)}"),
    ("unattended-upgrades", ["-oi", "-t"], UNATTENDED,
     SENDER, ROOTS, "me@example.org", ", ".join(ROOTS)),
    ("git send-email", ["-i", "-f", "dev@example.org", "list@example.net",
                        "reviewer@example.net"], GIT_SEND_EMAIL,
     "dev@example.org", ["list@example.net", "reviewer@example.net"],
     "Dev Eloper <dev@example.org>", "list@example.net"),
]


@pytest.mark.parametrize("client, flags, text, sender, recipients, from_, to", CLIENTS,
                         ids=[c[0] for c in CLIENTS])
def test_what_each_client_sends_arrives_fully_qualified(through_ssh, hoster, sendmail, client,
                                                        flags, text, sender, recipients, from_,
                                                        to):
    mm = through_ssh()
    result = sendmail(mm.port, *flags, message=text)
    assert result.returncode == 0, result.stderr
    message, = hoster.messages
    show(client, flags, message)
    assert (message.mail_from, message.rcpt_tos) == (sender, recipients)
    parsed = email.message_from_bytes(message.content, policy=policy.compat32)
    assert (parsed["From"], parsed["To"].replace("\r\n", "")) == (from_, to)
    for field, addresses in header_addresses(message).items():
        for address in addresses:
            assert_fully_qualified(address)
    given = re.search(r"^Message-I[dD]: <[^@>]+@([^>]+)>", text, re.M)
    domain = re.search(r"@([^>]+)>", parsed["Message-ID"])[1]
    assert domain == (given[1] if given else MAIL_NAME)      # a client's own ID is kept
    subject = re.search(r"^Subject: (.*)$", text, re.M)[1]
    assert parsed["Subject"] == subject                         # nothing else is rewritten
    assert not os.path.exists(COMMAND_MARK)


def test_real_bsd_mailx_through_the_symlink(through_ssh, hoster, sendmail, tmp_path):
    mailx = "/usr/bin/bsd-mailx"
    need("bsd-mailx", mailx)
    mm = through_ssh()
    sendmail(mm.port, "-bi")                              # writes the settings file
    mailrc = tmp_path / "mailrc"
    mailrc.write_text(f"set sendmail={tmp_path / 'bin' / 'sendmail'}\n")
    env = {**os.environ, "MAILRC": str(mailrc), "MINIMAIL_CONFIG": str(tmp_path / "minimail.conf")}
    result = subprocess.run([mailx, "-s", "hello", "-c", "root", "friend@example.net"],
                            input=b"body\n", capture_output=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: hoster.messages, 10, "the mail")
    message, = hoster.messages
    show("bsd-mailx (the real one)", ["-i", "-t"], message)
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ["friend@example.net", *ROOTS]
    assert header_addresses(message) == {"From": [SENDER], "To": ["friend@example.net"],
                                         "Cc": ROOTS}


def test_a_command_in_the_aliases_is_never_run(through_ssh, hoster, sendmail):
    mm = through_ssh()
    result = sendmail(mm.port, "-i", "www-data", message=MAILX)
    assert result.returncode == 0
    assert result.stderr.decode() == (
        f"minimail: www-data: |/bin/touch {COMMAND_MARK} is a command, which minimail never "
        f"runs: that mail goes to the admin address\n")
    assert not os.path.exists(COMMAND_MARK)
    assert hoster.messages[0].rcpt_tos == [ADMIN, *ROOTS]


def test_an_alias_loop_is_stopped_and_goes_to_the_admin(through_ssh, hoster, sendmail):
    mm = through_ssh()
    result = sendmail(mm.port, "-i", "LOOP1@localhost", message="Subject: loop\n\nround\n")
    assert result.returncode == 0
    assert result.stderr.decode() == ("minimail: alias loop: loop1 -> loop2 -> loop1: that mail "
                                      "goes to the admin address\n")
    assert hoster.messages[0].rcpt_tos == [ADMIN]


def test_without_sender_or_admin_a_local_sender_is_the_user_at_the_mail_name(
        through_ssh, hoster, sendmail):
    mm = through_ssh()
    result = sendmail(mm.port, "-oi", "-f", f"root@{HOST}", "friend@example.net",
                      message=MAILUTILS, settings=f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{mm.port}\n"
                                                  f"MINIMAIL_ALIASES=/dev/null\n")
    assert result.returncode == 0, result.stderr
    message, = hoster.messages
    user = pwd.getpwuid(os.getuid()).pw_name
    assert message.mail_from == f"{user}@{MAIL_NAME}"           # as Postfix's myorigin would
    assert header_addresses(message)["From"] == [f"{user}@{MAIL_NAME}"]


# ---------------------------------------------------------------------------
# newaliases and sendmail -bi
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, flags", [("newaliases", []), ("sendmail", ["-bi"])])
def test_newaliases_counts_a_good_file_and_starts_nothing(sendmail, local, tmp_path, name, flags):
    port = free_port()
    pidfile = tmp_path / "minimail.pid"
    settings = (f"MINIMAIL_DESTINATION=hoster.example\nMINIMAIL_OPTIONS=--listen 127.0.0.1:{port}"
                f" --pidfile {pidfile}\nMINIMAIL_ALIASES={local.aliases}\n")
    started = time.monotonic()
    result = sendmail(port, *flags, name=name, settings=settings)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.decode() == f"{local.aliases}: 6 aliases\n"
    assert time.monotonic() - started < 10
    assert not pidfile.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("name, flags", [("newaliases", []), ("sendmail", ["-bi"])])
def test_newaliases_names_the_lines_of_a_bad_file(sendmail, tmp_path, name, flags):
    aliases = tmp_path / "bad-aliases"
    aliases.write_text("root: ops@example.org\n  more@example.org\nno colon here\n"
                       "empty:\nroot: again@example.org\n")
    result = sendmail(1, *flags, name=name, settings=f"MINIMAIL_ALIASES={aliases}\n")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"{aliases}:3: no colon: not `name: target, ...` (no colon here)",
        f"{aliases}:4: empty has no target",
        f"{aliases}:5: root is given again (first on line 1): this one is ignored"]
    assert result.stdout.decode() == f"{aliases}: 1 alias\n"


# ---------------------------------------------------------------------------
# The daemon: bounces at the mail name, the double bounce, mailq
# ---------------------------------------------------------------------------

@pytest.fixture
def queued_then_refused(own_sshd, hoster, minimail_process, local, tmp_path):
    """deliver(settings) -> minimail: it takes a mail from nobody-home@example.org to
    gone@example.net while the hoster is away, then delivers; the hoster refuses both."""
    hoster.refuse = {"gone@example.net": "550 5.1.1 <gone@example.net>: no such user",
                     "nobody-home@example.org": "550 5.1.1 <nobody-home@example.org>: no such user"}

    def deliver(settings):
        local.settings.write_text(settings)
        pidfile = tmp_path / "minimail.pid"
        own_sshd.stop()
        try:
            mm = minimail_via(own_sshd, hoster, minimail_process, 30)(
                "--queue-retry", 0.5, "--pidfile", pidfile, "--config", local.settings)
            mm.pidfile = pidfile
            with socket.create_connection(("127.0.0.1", mm.port), timeout=30):
                pass
            import smtplib
            with smtplib.SMTP("127.0.0.1", mm.port, timeout=60) as smtp:
                smtp.sendmail("nobody-home@example.org", ["gone@example.net"],
                              make_message("double-bounce"))
        finally:
            own_sshd.start()
        return mm
    return deliver


def test_a_bounce_nobody_takes_goes_to_the_admin_at_the_mail_name(queued_then_refused, hoster):
    mm = queued_then_refused(f"MINIMAIL_ADMIN={ADMIN}\n")
    wait_until(lambda: [m for m in hoster.messages if m.rcpt_tos == [ADMIN]], 30,
               "the double bounce")
    notice, = hoster.messages
    text = notice.content.decode()
    assert notice.mail_from in ("", "<>")                  # the null sender
    assert f"From: Mail Delivery System <MAILER-DAEMON@{MAIL_NAME}>" in text
    assert f"Reporting-MTA: dns; {MAIL_NAME}" in text
    assert re.search(rf"^Message-ID: <[^@>]+@{re.escape(MAIL_NAME)}>\r$", text, re.M)
    assert f"To: <{ADMIN}>" in text and "Final-Recipient: rfc822; nobody-home@example.org" in text
    status = minimail_command("status", "--pidfile", mm.pidfile)
    assert "2 failed; in" in status.stdout                 # the mail and its bounce: both told


def test_failed_mail_nobody_was_told_about_is_counted(queued_then_refused, hoster):
    mm = queued_then_refused("")                        # no admin address
    wait_until(lambda: "not bounced (it is a bounce" in mm.log(), 30, "the bounce to fail")
    status = minimail_command("status", "--pidfile", mm.pidfile)
    assert "2 failed (1 nobody was told about); in" in status.stdout, status.stdout
    listing = minimail_command("queue", "--queue", mm.queue)
    assert "0 message(s) waiting, 2 failed (1 nobody was told about)" in listing.stdout
    assert len(re.findall(r"FAILED, nobody was told$", listing.stdout, re.M)) == 1
    assert hoster.messages == []


def test_mailq_as_another_user_says_in_one_line_that_it_needs_root(run_dir):
    queue = run_dir / "queue"
    queue.mkdir(mode=0o700)
    settings = run_dir / "minimail.conf"
    settings.write_text(f"MINIMAIL_OPTIONS=--queue {queue}\n")
    settings.chmod(0o644)
    if os.geteuid() != 0:
        pytest.skip("needs root, to become another user")
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:                                     # as nobody, invoked as mailq
        os.close(read_end)
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        os.environ.update(MINIMAIL_CONFIG=str(settings), HOME="/nonexistent")
        sys.stdout = sys.stderr = os.fdopen(write_end, "w")
        sys.argv = ["/usr/bin/mailq"]
        status = minimail.main()
        sys.stdout.flush()
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as output:
        said = output.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 69
    assert said == (f"minimail: cannot read the queue in {queue}: it belongs to root; listing it "
                    f"needs root (try sudo)\n")


def test_mailq_finds_the_machines_queue_when_the_user_has_none(tmp_path, monkeypatch):
    paths = minimail.Paths(str(tmp_path / "run" / "minimail.pid"), str(tmp_path / "log"),
                           str(tmp_path / "own-queue"))
    monkeypatch.setattr(minimail, "default_paths", lambda: paths)
    machine = [str(tmp_path / "spool"), str(tmp_path / "service-queue")]
    os.mkdir(machine[1])
    nothing = minimail.SettingsFile()
    assert minimail.mailq_directory(nothing, machine) == machine[1]
    os.mkdir(machine[0])
    assert minimail.mailq_directory(nothing, machine) == machine[0]       # root's daemon's
    os.mkdir(paths.queue)
    assert minimail.mailq_directory(nothing, machine) == paths.queue      # the user's own


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------

def test_check_shows_what_the_sendmail_command_would_do(check_setup, sshd, hoster, local):
    local.settings.write_text(f"MINIMAIL_SENDER={SENDER}  # masquerade\n"
                              f"MINIMAIL_ADMIN={ADMIN}\nMINIMAIL_ALIASES={local.aliases}\n")
    env = {**os.environ, "MINIMAIL_CONFIG": str(local.settings)}
    result = minimail_command("check", *AS_ROOT, "--ssh", sshd.ssh, "--remote",
                              f"127.0.0.1:{hoster.port}", "hoster", env=env)
    assert result.returncode == 0, result.stdout
    user = pwd.getpwuid(os.getuid()).pw_name
    assert f"sendmail settings: {local.settings} (for {user})\n" in result.stdout
    assert f"        sender (of local mail, -f root@HOST too): {SENDER}\n" in result.stdout
    assert f"        admin (for mail to root and other local names): {ADMIN}\n" in result.stdout
    assert f"        aliases: {local.aliases}, 6 alias(es)\n" in result.stdout
    assert f"        mail name (Message-IDs, bounces): {MAIL_NAME}\n" in result.stdout
    assert "warning" not in result.stdout
    local.settings.write_text(f"MINIMAIL_ALIASES={local.aliases}\n")
    result = minimail_command("check", *AS_ROOT, "--ssh", sshd.ssh, "--remote",
                              f"127.0.0.1:{hoster.port}", "hoster", env=env)
    assert "        warning: neither MINIMAIL_SENDER nor MINIMAIL_ADMIN is set" in result.stdout


def test_checks_host_key_hint_names_the_known_hosts_file_ssh_uses(check_setup, sshd, tmp_path):
    config, _ = ssh_config_with_key(sshd, tmp_path, "key")
    known_hosts = tmp_path / "elsewhere_known_hosts"
    known_hosts.write_text("")
    config.write_text(config.read_text().replace(f"{sshd.root}/known_hosts", str(known_hosts))
                      .replace(f"{tmp_path}/key", f"{sshd.root}/client_key"))
    result = check_setup(ssh=f"ssh -F {config}")
    assert result.returncode == 1
    assert "FAIL  the hoster's host key was not accepted" in result.stdout
    assert f"ssh-keyscan -p PORT HOST >> {known_hosts} " in result.stdout


# ---------------------------------------------------------------------------
# The pure parts
# ---------------------------------------------------------------------------

def names(sender=SENDER, admin=ADMIN, mailname=MAIL_NAME, fqdn="vm.lan"):
    settings_file = minimail.SettingsFile(values={"MINIMAIL_SENDER": sender or "",
                                                  "MINIMAIL_ADMIN": admin or ""})
    return minimail.MailNames(settings_file, hostname="vm", fqdn=fqdn, mailname=mailname)


def test_which_addresses_are_local():
    here = names()
    for address in ("root", "root@vm", "root@VM.lan", "root@localhost", "x@localhost.localdomain",
                    f"cron@{MAIL_NAME}", "a@vm.", "root@[127.0.0.1]"):
        assert here.is_local(address), address
    for address in ("me@example.org", "a@example.net", "a@vm.example.org", "a@lan"):
        assert not here.is_local(address), address
    sender_domain = names(sender="me@desktop.example.net")   # the mail name is a real domain
    assert not sender_domain.is_local(f"cron@{MAIL_NAME}")
    lazy = names(fqdn=None)
    assert lazy.is_local("root@vm") and lazy.fqdn is None     # no resolver call for it


def test_the_mail_name_is_never_a_bare_host_name():
    assert minimail.choose_mail_name("mail.example.org", lambda: "vm.lan") == "mail.example.org"
    assert minimail.choose_mail_name("vm", lambda: "vm.lan") == "vm.lan"
    assert minimail.choose_mail_name("vm", lambda: "localhost", "me@example.org") == "example.org"
    assert minimail.choose_mail_name("", lambda: "localhost.localdomain", None, "a@b.example") \
        == "b.example"
    assert minimail.choose_mail_name("vm", lambda: "vm") is None
    assert names(mailname="vm", fqdn="vm", sender=None, admin=None).mail_name() == \
        "localhost.localdomain"
    assert names(mailname="", fqdn="vm").masquerade() == SENDER
    assert names(sender=None).masquerade() == ADMIN
    assert names(sender=None, admin=None, mailname="", fqdn="vm").masquerade() is None


def test_the_mail_name_file(tmp_path, monkeypatch):
    path = tmp_path / "mailname"
    for text, name in (("Mail.Example.org\n", "mail.example.org"), ("vm\n", "vm"), ("", ""),
                       ("bad name!\n", "bad"), ("\x00\xff\n", "")):
        path.write_bytes(text.encode("latin-1"))
        assert minimail.read_mailname(str(path)) == name, text
    monkeypatch.setenv("MINIMAIL_MAILNAME", str(path))
    path.write_text("desktop.example.net\n")
    assert minimail.read_mailname() == "desktop.example.net"
    assert minimail.read_mailname(str(tmp_path / "missing")) == ""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)                                   # nothing writes: it must not stall
    assert minimail.read_mailname(str(fifo)) == ""
    assert minimail.Aliases.read(str(fifo)).table == {}


def test_aliases_are_parsed_as_aliases_5_says():
    table, problems = minimail.parse_aliases(ALIASES + '"Quoted Name": a@example.org\n'
                                             'list: "|cmd a, b", /var/mail/x,, :include:/l\n')
    assert problems == []
    assert table["ops"] == ["ops@example.org", "oncall@example.net"]      # continued
    assert table["loop1"] == ["loop2"]                                    # names in lower case
    assert table["www-data"] == [f"|/bin/touch {COMMAND_MARK}", "root"]   # quotes removed
    assert table["quoted name"] == ["a@example.org"]
    assert table["list"] == ["|cmd a, b", "/var/mail/x", ":include:/l"]
    _, problems = minimail.parse_aliases("  leading continuation\nx y: z\nok: a\nok: b\nc:\n")
    assert problems == [
        (1, "a continuation line (it starts with white space) with no alias before it"),
        (2, "'x y' is not an alias name"), (4, "ok is given again (first on line 3): this one is "
                                               "ignored"), (5, "c has no target")]


def test_aliases_expand_through_chains_and_stop_at_loops():
    aliases = minimail.Aliases(None, *minimail.parse_aliases(ALIASES + "self: self, me@x.org\n"))
    here, admin = names(), minimail.TO_ADMIN
    assert minimail.expand("postmaster", aliases, here) == (ROOTS, [])
    assert minimail.expand("nobody", aliases, here) == ([admin], [])
    assert minimail.expand("a@example.org", aliases, here) == (["a@example.org"], [])
    assert minimail.expand("self", aliases, here) == ([admin, "me@x.org"], [])   # no note
    found, notes = minimail.expand("loop2@vm", aliases, here)
    assert found == [admin] and notes == ["alias loop: loop2 -> loop1 -> loop2: that mail goes "
                                          "to the admin address"]
    big = minimail.Aliases(None, {f"a{i}": [f"a{i + 1}", f"a{i + 1}"] for i in range(30)})
    found, notes = minimail.expand("a0", big, here)
    assert len(found) <= minimail.ALIAS_STEPS_MAX and found[-1] is admin and len(notes) == 1


def test_deliverable_recipients_are_each_once_and_need_an_admin():
    aliases = minimail.Aliases(None, *minimail.parse_aliases(ALIASES))
    settings = minimail.SettingsFile(values={"MINIMAIL_ADMIN": ADMIN})
    assert minimail.deliverable(["root", "ops", "alice", "nobody@vm"], settings, aliases,
                                names()) == [*ROOTS, ADMIN]
    with pytest.raises(minimail.SendmailExit) as failure:
        minimail.deliverable(["alice"], minimail.SettingsFile(), aliases, names(admin=None))
    assert failure.value.status == 67
    assert minimail.deliverable(["alice"], minimail.SettingsFile(), aliases, names(admin=None),
                                quiet=True) == []
    with pytest.raises(minimail.SendmailExit) as failure:
        minimail.deliverable(["alice"], minimail.SettingsFile(values={"MINIMAIL_ADMIN": "root"}),
                             aliases, names(admin="root"))
    assert failure.value.status == 78


def test_the_envelope_sender_is_masqueraded_unless_real():
    settings = minimail.SettingsFile(path="/etc/default/minimail")
    assert minimail.envelope_sender(None, settings, names()) == SENDER         # the user's
    assert minimail.envelope_sender("root@vm", settings, names()) == SENDER    # mailutils'
    assert minimail.envelope_sender("dev@example.org", settings, names()) == "dev@example.org"
    assert minimail.envelope_sender("", settings, names()) == ""              # <>
    nothing = names(sender=None, admin=None, mailname="", fqdn="vm")
    with pytest.raises(minimail.SendmailExit) as failure:
        minimail.envelope_sender("root", settings, nothing)
    assert failure.value.status == 78
    assert str(failure.value) == ("no sender address for local mail: set "
                                  "MINIMAIL_SENDER=you@example.org in /etc/default/minimail")


@pytest.mark.parametrize("given, wanted", [
    (b"From: root (Cron Daemon)", [b"From: Cron Daemon <me@example.org>"]),
    (b"From: root", [b"From: me@example.org"]),
    (b"From: Root User <root@vm>", [b"From: Root User <me@example.org>"]),
    (b'From: "Root, the admin" <root@localhost>', [b'From: "Root, the admin" <me@example.org>']),
    (b"From: =?utf-8?q?R=C3=B6ot?= <root>", [b"From: =?utf-8?q?R=C3=B6ot?= <me@example.org>"]),
    (b"From: dev@example.org", [b"From: dev@example.org"]),
    (b"Reply-To: root@vm", [b"Reply-To: me@example.org"]),
    (b"Sender: root", [b"Sender: me@example.org"]),
    (b"To: root", [b"To: ops@example.org, oncall@example.net"]),
    (b"To: Root <root@vm>", [b"To: ops@example.org, oncall@example.net"]),
    (b"Cc: Alice <alice>, bob@example.net", [b"Cc: Alice <admin@example.org>, bob@example.net"]),
    (b'To: "a, b" <x@example.net>,\r\n c@example.net', [b'To: "a, b" <x@example.net>,\r\n c@example.net']),
    (b"To: undisclosed-recipients:;", [b"To: undisclosed-recipients:;"]),
    (b"To: Friends: root, alice;", [b"To: Friends: root, alice;"]),
    (b"To: (unclosed comment root", [b"To: (unclosed comment root"]),
    (b"Subject: mail for root@vm", [b"Subject: mail for root@vm"]),
    (b"Bcc: root", [b"Bcc: root"]),
    (b"To: " + b", ".join(b"u%d@example.net" % i for i in range(6)) + b", root",
     [b"To: u0@example.net,"] + [b" u%d@example.net," % i for i in range(1, 6)] +
     [b" ops@example.org,", b" oncall@example.net"]),
])
def test_header_addresses_are_rewritten_where_they_are_local(given, wanted):
    aliases = minimail.Aliases(None, *minimail.parse_aliases(ALIASES))
    here = names()
    delivered = lambda address: minimail.deliverable([address], minimail.SettingsFile(
        values={"MINIMAIL_ADMIN": ADMIN}), aliases, here, quiet=True)
    header = given.split(b"\r\n")
    assert minimail.rewrite_header(header, here.is_local, SENDER, delivered) == \
        [line for chunk in wanted for line in chunk.split(b"\r\n")]


@pytest.mark.parametrize("raw, value", [
    ("you@example.org   # the envelope sender", "you@example.org"),
    ("you@example.org#not-a-comment", "you@example.org#not-a-comment"),
    ("'you@example.org'  # quoted", "you@example.org"),
    ('"Me <me@example.org>"', "Me <me@example.org>"),
    ('a\\ b "c # d"', "a b c # d"),
    ("", ""),
    ("# only a comment", ""),
])
def test_settings_values_are_read_as_a_shell_reads_them(raw, value):
    assert minimail.settings_value("MINIMAIL_SENDER", raw) == value


@pytest.mark.parametrize("raw, words", [
    ('--listen 127.0.0.1:2525 --linger 30 -o "ConnectTimeout 10"   # a comment',
     ["--listen", "127.0.0.1:2525", "--linger", "30", "-o", "ConnectTimeout 10"]),
    ("\"--listen 127.0.0.1:2525 --ssh 'ssh -F /x y'\"", ["--listen", "127.0.0.1:2525", "--ssh",
                                                          "ssh -F /x y"]),
    ("--ssh='ssh -F /x'", ["--ssh=ssh -F /x"]),
    ("--no-queue", ["--no-queue"]),
])
def test_minimail_options_are_split_into_words(tmp_path, raw, words):
    path = tmp_path / "settings"
    path.write_text(f"MINIMAIL_OPTIONS={raw}\n")
    assert minimail.SettingsFile.read(path).options == words


def test_an_unclosed_quote_in_the_settings_is_named_with_its_line(tmp_path):
    path = tmp_path / "settings"
    path.write_text("# settings\nMINIMAIL_SENDER='you@example.org\n")
    with pytest.raises(minimail.UsageError, match=r":2: MINIMAIL_SENDER: no closing quotation"):
        minimail.SettingsFile.read(path)


def test_every_settings_example_in_the_readme_works_as_written(tmp_path):
    readme = (Path(minimail.__file__).parent / "README.md").read_text()
    blocks = [block for block in re.findall(r"```[a-z]*\n(.*?)```", readme, re.S)
              if re.search(r"^\s*MINIMAIL_\w+=", block, re.M)]
    assert len(blocks) >= 3
    for number, block in enumerate(blocks):
        path = tmp_path / f"example-{number}"
        lines = [line.strip() for line in block.splitlines()
                 if re.match(r"\s*(export\s+)?MINIMAIL_\w+=", line)]
        path.write_text("\n".join(lines) + "\n")
        settings = minimail.SettingsFile.read(path)
        for address in (settings.sender, settings.admin):
            assert address is None or re.fullmatch(r"[\w.+-]+@[\w.-]+\.\w+", address), block
        assert all(" " not in word or word.startswith("ConnectTimeout") for word in
                   settings.options), block
        if settings.options:
            minimail.split_argv(settings.options)          # options minimail knows
