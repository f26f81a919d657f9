# The two kinds of node the VM tests are made of: nixfarm's client or builder
# module on node.nix (the test farm and keys), enabled. A test passes only
# what it changes: `client` is merged into services.nixfarm.client,
# `builder` into services.nixfarm.builder, `machine` beside them (VM size).
{ self }:
{
  client = client: {
    imports = [
      self.nixosModules.client
      ./node.nix
    ];
    services.nixfarm.client = {
      enable = true;
      sshKey = "/etc/nix/nixfarm_ed25519";
    }
    // client;
  };

  builder =
    {
      builder ? { },
      machine ? { },
    }:
    {
      imports = [
        self.nixosModules.builder
        ./node.nix
      ];
      services.nixfarm.builder = {
        enable = true; # name: the node's host name
      }
      // builder;
    }
    // machine;
}
