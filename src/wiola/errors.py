"""Error types shared by the toolchain, and the one-line checks every command shares."""

# Seeds go to numpy and transformers' set_seed (0 .. 2**32 - 1) as well as torch; larger ones overflowed there.
MAX_SEED = 2**32 - 1


class WiolaError(Exception):
    """An error caused by the user's input; the CLI prints its message on one line and exits 2."""


def reason(exc: BaseException, fallback: str = "") -> str:
    """The first non-empty line of `exc`'s message (at most 200 characters), else `fallback`: the reason part of a
    one-line note such as "the ONNX export failed (TypeError: ...)"."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), fallback)[:200]


def check_seed(seed, what: str = "--seed") -> int:
    """`seed` itself when it is an integer in 0 .. 2**32 - 1; else a one-line `WiolaError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise WiolaError(f"{what} must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {seed!r}")
    return seed
