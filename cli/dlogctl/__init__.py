"""dlogctl: the command-line interface of dlog."""
