# Types of the C extension built from _sigbus_guard.c (mypy cannot read a compiled module).

def guard(address: int, length: int, /) -> int:
    """Guard [address, address + length) against SIGBUS; returns the slot that holds the range."""

def faulted(slot: int, /) -> bool:
    """Whether a SIGBUS hit the slot's range."""

def unguard(slot: int, /) -> None:
    """Stop guarding the slot; call it before unmapping the range."""
