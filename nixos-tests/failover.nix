# failover: a builder whose link goes down leaves the client's machines file
# within the configured time, builds go on on the other builder, and it comes
# back when the link returns. The dispatcher (`nixfarm dispatch`, issue 4)
# keeps that file; this test is its timing on real VMs.
{ self }:
let
  node = import ./nodes.nix { inherit self; };
in
{
  nodes = {
    client = node.client {
      # Short timings, so the test takes seconds, not minutes: a snapshot
      # every second, the link declared dead after 3 missed 1 s keepalives,
      # retries after 5 s, then at most every 10 s (nixfarm dispatch --help).
      dispatcher.extraArgs = [
        "--interval"
        "1"
        "--keepalive"
        "1"
        "--backoff-base"
        "5"
        "--backoff-max"
        "10"
      ];
    };
    builder1 = node.builder { };
    builder2 = node.builder { };
  };
}
