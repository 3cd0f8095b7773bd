"""Client-certificate subjects as API keys name them (``cert_subjects``): RFC 4514 strings in
one spelling, so that a key file's subject and a verified certificate's compare equal."""

from __future__ import annotations

__all__ = ["normalize_subject"]


def normalize_subject(subject: str) -> str:
    """An RFC 4514 distinguished name in one spelling: no spaces around the ``,``/``+``
    separators and ``=``, attribute types upper-case (``cn=a, o=B`` -> ``CN=a,O=B``). Values
    are kept as written, escapes included (``\\,`` and an escaped trailing ``\\ `` stay)."""
    out: list[str] = []
    atom: list[str] = []  # characters of one type=value; an escape pair is one item

    def flush(sep: str) -> None:
        while atom and atom[0].isspace():
            atom.pop(0)
        while atom and atom[-1].isspace():
            atom.pop()
        text = "".join(atom)
        kind, eq, value = text.partition("=")
        if eq:
            kind = kind.strip()
            text = (kind.upper() if kind.isalpha() else kind) + "=" + value.lstrip()
        out.append(text + sep)
        atom.clear()

    i, n = 0, len(subject)
    while i < n:
        c = subject[i]
        if c == "\\" and i + 1 < n:
            atom.append(subject[i : i + 2])
            i += 2
            continue
        if c in ",+":
            flush(c)
        else:
            atom.append(c)
        i += 1
    flush("")
    return "".join(out)
