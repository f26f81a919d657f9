# The VM tests: each is <name>.nix (its nodes) and <name>.py (its script).
# default.nix makes a check of each; tests/nix/vm-node-facts.nix evaluates
# their nodes.
[
  "offload"
  "gateway"
  "failover"
  "gc"
  "memory-cap"
]
