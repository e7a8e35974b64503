"""A second read of the queue's pieces where they meet (issue 15's review):
each test here shows one bug found there, against the real program.

As in test_queue: this module's sshd is stopped so the tunnel cannot be had
and minimail serves the client itself; hand-driven sockets speak SMTP.
"""

import time

import pytest

from test_queue import Dialogue, hoster_reachable, queueing   # noqa: F401 (fixtures)


pytestmark = pytest.mark.timeout(120)


def test_a_size_in_digits_that_are_not_ascii_gets_a_reply_not_a_traceback(
        queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing()
    talk = Dialogue(mm.port)
    talk.reply()
    talk.command("EHLO desktop.example")
    assert talk.command("MAIL FROM:<a@b> SIZE=\u00b2").startswith(b"555 5.5.4")   # a superscript 2
    assert talk.command("MAIL FROM:<a@b> SIZE=12").startswith(b"250")         # the session goes on
    talk.close()
    time.sleep(0.5)
    assert "Traceback" not in mm.log()
