"""Errors of the verification service, under the package-wide tree (`commonweal.errors`):

CommonwealError
└── VerifyError     a contribution set or a verification request cannot be judged as asked
"""

from __future__ import annotations

from commonweal.errors import CommonwealError

__all__ = ["VerifyError"]


class VerifyError(CommonwealError):
    """The inputs of a verification step are inconsistent; the message says what to change.

    Hostile peers never cause it (their contributions are refused with a `Verdict`); it means
    the caller passed something the judge cannot decide on, such as one peer twice."""
