#!/usr/bin/python3
"""Write minimail(8) to standard output, made from minimail.py's docstring
(which is also `minimail --help` and the command-line grammar).

Usage: python3 debian/manpage.py minimail.py >debian/minimail.8

The docstring's shape: a first line "minimail: what it is."; paragraphs;
"Usage:", "Commands:" and "Options:" blocks (an entry begins two spaces in,
its description follows after two or more spaces or on deeper-indented
lines); then paragraphs that begin with a title and a colon ("The queue:
...", "Exit status: ..."), each of which becomes a section.
"""

import ast
import re
import sys
import time

#: A paragraph that starts a section: a short title, a colon, the text.
TITLED = re.compile(r"([A-Z][A-Za-z ]{0,30}): (.*)", re.S)
#: The Debian package's own facts, after the docstring's sections.
DEBIAN = """\
This package runs minimail.service as the system user minimail, whose home
/var/lib/minimail holds its ssh key (~/.ssh/id_ed25519), known_hosts and
ssh config; the queue is /var/lib/minimail/queue.  The settings file is
/etc/default/minimail.  Until MINIMAIL_DESTINATION is set there, the service
runs idle (--idle-without-destination): it listens and queues mail, runs no
tunnel, and says so in the journal and in `minimail status`.
/usr/sbin/sendmail, /usr/lib/sendmail, mailq and newaliases are minimail.
minimail.socket (socket activation) is installed but not enabled; its
drop-in is /usr/share/doc/minimail/examples/minimail-socket.conf."""


def roff(text):
    """Text as roff reads it literally: backslashes, minus signs, and no line
    that starts with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def blocks(doc):
    """The docstring's paragraphs (split at blank lines)."""
    return [block for block in re.split(r"\n\s*\n", doc.strip("\n")) if block.strip()]


def entries(block):
    """[(tag, description)] of a Commands: or Options: block."""
    found = []
    for line in block.splitlines()[1:]:
        if re.match(r"  \S", line):
            tag, _, text = line.strip().partition("  ")
            found.append([tag, text.strip()])
        elif found:
            found[-1][1] = f"{found[-1][1]} {line.strip()}".strip()
    return found


def synopsis(block):
    lines = []
    for line in block.splitlines()[1:]:
        if re.match(r"  \S", line):
            lines.append(line.strip())
        elif lines:
            lines[-1] += " " + line.strip()
    return [".SH SYNOPSIS", ".nf", *(roff(line) for line in lines), ".fi"]


def tagged(title, block):
    out = [f'.SH "{title}"']
    for tag, text in entries(block):
        out += [".TP", f"\\fB{roff(tag)}\\fR", roff(text)]
    return out


def manual(doc, version):
    name, _, rest = doc.strip().partition("\n")
    program, _, what = name.partition(": ")
    head = [f'.TH {program.upper()} 8 "{time.strftime("%Y-%m-%d", build_date())}" '
            f'"{program} {version}" "System Administration"',
            ".SH NAME", f"{program} \\- {roff(what.rstrip('.'))}"]
    description, sections = [], []
    for block in blocks(rest):
        first = block.splitlines()[0].strip()
        if first == "Usage:":
            head += synopsis(block)
        elif first in ("Commands:", "Options:"):
            sections += tagged(first.rstrip(":").upper(), block)
        elif TITLED.match(block) and sections:
            title, text = TITLED.match(block).groups()
            sections += [f'.SH "{title.upper()}"', roff(text)]
        else:
            description += [".PP", roff(block)]
    return "\n".join(head + [".SH DESCRIPTION"] + description[1:] + sections + [
        '.SH "THE DEBIAN PACKAGE"', roff(DEBIAN),
        '.SH "SEE ALSO"', "ssh(1), ssh_config(5), systemd.service(5),",
        "/usr/share/doc/minimail/README.md.gz"]) + "\n"


def build_date():
    """SOURCE_DATE_EPOCH (reproducible builds; dpkg sets it from the changelog), else now."""
    import os
    return time.gmtime(int(os.environ.get("SOURCE_DATE_EPOCH", time.time())))


def main(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    version = next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "__version__")
    sys.stdout.write(manual(ast.get_docstring(tree, clean=False), version))


if __name__ == "__main__":
    main(sys.argv[1])
