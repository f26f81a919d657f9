# The two kinds of node the VM tests are made of: nixfarm's client or builder
# module on node.nix (the test farm), enabled, with that role's test keys in
# place. A test passes only what it changes: `client` is merged into
# services.nixfarm.client, `builder` into services.nixfarm.builder, `machine`
# beside them (VM size).
{ self }:
let
  # environment.etc with a mode copies the file (root-owned, that mode)
  # instead of linking into the world-readable store: ssh refuses a private
  # key or host key that others can read.
  secret = file: {
    source = file;
    mode = "0600";
  };
in
{
  client = client: {
    imports = [
      self.nixosModules.client
      ./node.nix
    ];
    services.nixfarm.client = {
      enable = true;
      sshKey = "/etc/nix/nixfarm_ed25519";
      # The test's pinned key (farm.nix), not one made at boot.
      signingKeyFile = "/etc/nixfarm-test/signing-key";
    }
    // client;
    # The client's own key where sshKey says, and the other roles' keys for
    # the tests that use them.
    environment.etc = {
      "nix/nixfarm_ed25519" = secret ./keys/client;
      "nixfarm-test/monitor_ed25519" = secret ./keys/monitor;
      "nixfarm-test/ops_ed25519" = secret ./keys/ops;
      "nixfarm-test/signing-key" = secret ./keys/client_signing;
      "nixfarm-test/signing-key.pub".source = ./keys/client_signing.pub;
    };
    # A client never builds locally here, so every build shows where the farm
    # sent it (as in nixpkgs' nixos/tests/nix/remote-build.nix).
    nix.settings.max-jobs = 0;
  };

  builder =
    {
      builder ? { },
      machine ? { },
    }:
    { config, ... }:
    {
      imports = [
        self.nixosModules.builder
        ./node.nix
      ];
      services.nixfarm.builder = {
        enable = true; # name: the node's host name
      }
      // builder;
      # The host key the inventory pins for this builder (builder1, builder2).
      environment.etc."ssh/ssh_host_ed25519_key" =
        secret (./keys + "/${config.services.nixfarm.builder.name}_host");
    }
    // machine;
}
