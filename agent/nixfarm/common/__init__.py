"""What both sides use: errors, atomic writes, inotify, logging, sd_notify, Nix's
configuration and store database, and what a key may see of other clients."""
