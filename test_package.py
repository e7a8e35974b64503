"""minimail as Debian's MTA (debian/, .ci/check-deb): what the package relies on.

The package's service starts before anyone has set MINIMAIL_DESTINATION: it
then listens and queues, runs no tunnel, and says why in one line of its log
and of `minimail status`.  The package itself is built, linted, installed,
used and purged by .ci/check-deb, in a throwaway overlay of the machine's root.
"""

import os
import re
import subprocess
from pathlib import Path

import minimail
from conftest import console_script, free_port, make_message, minimail_command, send_mail, wait_until

HERE = Path(__file__).resolve().parent


def test_without_a_destination_the_service_idles_and_queues(minimail_process, run_dir):
    settings = run_dir / "default-minimail"
    settings.write_text("# MINIMAIL_DESTINATION=you@hoster.example\n"
                        "MINIMAIL_ADMIN=admin@hoster.example\n")
    pidfile = run_dir / "minimail.pid"
    mm = minimail_process("--idle-without-destination", "--config", settings, "--pidfile", pidfile)
    idle = f"idle: MINIMAIL_DESTINATION is not set in {settings}"
    mm.wait_for_log(re.escape(idle))

    send_mail(mm.port, make_message("idle"))             # accepted: 250 queued
    mm.wait_for_log(r"queued: \d+ bytes")

    def status():
        result = minimail_command("status", "--pidfile", pidfile)
        return "1 message(s) waiting" in result.stdout and result
    lines = wait_until(status, 10, "the queued mail in `minimail status`").stdout.splitlines()
    assert f"tunnel: none: {idle}" in lines
    assert mm.tunnel_starts() == 0 and mm.tunnels() == []
    assert mm.log().count(f"WARNING {idle}") == 1


def test_without_a_destination_and_not_told_to_idle_it_is_a_usage_error(tmp_path):
    settings = tmp_path / "minimail.conf"
    settings.write_text("MINIMAIL_ADMIN=admin@hoster.example\n")
    result = minimail_command("--foreground", "--config", settings, "--listen", "127.0.0.1:1")
    assert result.returncode == 2 and "DESTINATION is missing" in result.stderr


def test_the_debian_changelog_names_this_version():
    first = (HERE / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"minimail ({minimail.__version__}) "), first


def test_newaliases_checks_the_aliases_and_never_starts_a_daemon(tmp_path):
    """Other packages' maintainer scripts run `newaliases` after they add an
    alias; with MINIMAIL_DESTINATION set, minimail under that name must not
    take it for `minimail start`."""
    link = tmp_path / "newaliases"
    link.symlink_to(console_script())
    settings = tmp_path / "minimail.conf"
    settings.write_text(f"MINIMAIL_DESTINATION=you@hoster.example\n"
                        f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{free_port()} --pidfile {tmp_path}/m.pid\n")
    result = subprocess.run([link], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MINIMAIL_CONFIG": str(settings)})
    assert result.returncode == 0, result.stderr
    assert "started" not in result.stdout and not (tmp_path / "m.pid").exists()
