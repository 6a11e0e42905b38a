"""Small helpers shared across modules."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative integers: how many pieces of size b cover a."""
    return -(-a // b)
