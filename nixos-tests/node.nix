# What every node of the VM tests shares besides nixfarm's own modules: the
# test farm, its test-only keys in place, and a Nix that never waits on the
# network. Nothing here configures what the modules configure (users, sshd,
# nix.conf's farm settings, the agent and dispatcher units): the tests check
# the modules as a user gets them.
{ config, lib, ... }:
let
  builder = config.services.nixfarm.builder;
  client = config.services.nixfarm.client;
  # environment.etc with a mode copies the file (root-owned, that mode)
  # instead of linking into the world-readable store: ssh refuses a private
  # key or host key that others can read.
  secret = file: {
    source = file;
    mode = "0600";
  };
in
{
  services.nixfarm.farm = import ./farm.nix;

  # The VMs have no route to a binary cache: without this every build first
  # waits for substituters that cannot answer.
  nix.settings.substituters = lib.mkForce [ ];
  # A client never builds locally here, so every build shows where the farm
  # sent it (as in nixpkgs' nixos/tests/nix/remote-build.nix).
  nix.settings.max-jobs = lib.mkIf client.enable 0;

  environment.etc = lib.mkMerge [
    # The host key the inventory pins for this builder (builder1, builder2).
    (lib.mkIf builder.enable {
      "ssh/ssh_host_ed25519_key" = secret (./keys + "/${builder.name}_host");
    })
    # The client's own key where services.nixfarm.client.sshKey says, and
    # the other roles' keys for the tests that use them.
    (lib.mkIf client.enable {
      "nix/nixfarm_ed25519" = secret ./keys/client;
      "nixfarm-test/monitor_ed25519" = secret ./keys/monitor;
      "nixfarm-test/ops_ed25519" = secret ./keys/ops;
    })
  ];
}
