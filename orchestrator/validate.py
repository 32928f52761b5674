"""Validation of user-supplied names and addresses, shared by every layer.

Names end up in file paths, libvirt domain names and NBD export names, so they are restricted to a
conservative alphabet: this rules out path traversal (``/``, ``..``) and shell or XML surprises.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import ValidationError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_NAME = 63


def name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a safe object name, else raise ValidationError saying why."""
    if not isinstance(value, str) or value == "":
        raise ValidationError(f"invalid {what} {value!r}: must be a non-empty string")
    if "/" in value or ".." in value:
        raise ValidationError(f"invalid {what} {value!r}: must not contain '/' or '..'")
    if len(value) > MAX_NAME:
        raise ValidationError(f"invalid {what} {value[:20]!r}...: longer than {MAX_NAME} characters")
    if not NAME_RE.match(value):
        raise ValidationError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return value


def ip_interface(value: object, what: str = "address") -> ipaddress.IPv4Interface:
    """Parse ``A.B.C.D/NN`` (or ``A.B.C.D`` with a separate netmask) into an interface."""
    try:
        return ipaddress.IPv4Interface(str(value))
    except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError) as err:
        raise ValidationError(f"invalid {what} {value!r}: {err}") from None


def ip_address(value: object, what: str = "address") -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except (ipaddress.AddressValueError, ValueError) as err:
        raise ValidationError(f"invalid {what} {value!r}: {err}") from None
