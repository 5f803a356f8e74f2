"""The systemd-nspawn harness (nspawn.py) and what it runs inside the container."""
