# failover: a builder whose link goes down leaves the client's machines file
# within the configured time, builds go on on the other builder, and it comes
# back when the link returns. The dispatcher (`nixfarm dispatch`, issue 4)
# keeps that file; this test is its timing on real VMs.
{ self }:
let
  builder = {
    imports = [
      self.nixosModules.builder
      ./node.nix
    ];
    services.nixfarm.builder.enable = true;
  };
in
{
  nodes = {
    client = {
      imports = [
        self.nixosModules.client
        ./node.nix
      ];
      services.nixfarm.client = {
        enable = true;
        sshKey = "/etc/nix/nixfarm_ed25519";
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
    };
    builder1 = builder;
    builder2 = builder;
  };
}
