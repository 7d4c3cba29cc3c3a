"""Engine building and the fast runtime (see issue 6)."""
